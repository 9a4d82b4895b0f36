"""One step on 2 logical CPU replicas updates the weights exactly as one device does for the
same global batch (loss scaling, per-sample losses and normalisation are replica-invariant)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf.methods import GRL, SourceOnly
from uda_tf.models.discriminators import domain_classifier
from uda_tf.training.schedules import LambdaSchedule


def _build(method, strategy, norm):
    with strategy.scope():
        seg = tiny_segmentor(norm=norm, sync=strategy.num_replicas_in_sync > 1, seed=0)
        if method == "grl":
            keras.utils.set_random_seed(1)
            clf = domain_classifier(seg.output["features"].shape[1:], hidden=(8, 8))
            model = GRL(seg, CLASS_NAMES, domain_classifier=clf,
                        lambda_schedule=LambdaSchedule("dann", 1.0, 4))
            model.compile(keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05))
        else:
            model = SourceOnly(seg, CLASS_NAMES)
            model.compile(keras.optimizers.SGD(0.05))
        model.build_optimizers()
    return model


def _weights_after_steps(method, strategy, norm, steps=2):
    model = _build(method, strategy, norm)
    before = [v.numpy() for v in model.trainable_variables]
    x_s, y_s, x_t = tiny_batch(n=4)
    element = ((x_s, y_s), x_t) if method == "grl" else (x_s, y_s)
    ds = tf.data.Dataset.from_tensors(element).repeat()
    logs = model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0).history
    return before, [v.numpy() for v in model.trainable_variables], logs


@pytest.mark.parametrize("method,norm", [("source_only", "instance"), ("grl", "instance"),
                                         ("source_only", "batch"), ("grl", "batch")])
def test_two_replicas_match_one_device(method, norm, one_device, two_replicas):
    b1, w1, logs1 = _weights_after_steps(method, one_device, norm)
    b2, w2, logs2 = _weights_after_steps(method, two_replicas, norm)
    for x, y in zip(b1, b2):
        np.testing.assert_array_equal(x, y)  # same start
    moved = max(float(np.abs(a - b).max()) for a, b in zip(w1, b1))
    assert moved > 1e-4, "the step did not change the weights; the comparison would be empty"
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logs1["seg_loss"], logs2["seg_loss"], rtol=1e-5)
