"""Mixed precision for the methods a user can pick today: a step gives finite losses, weights
and outputs stay float32, float16 scales every optimizer's loss; and the gradient helper every
train_step uses scales exactly as LossScaleOptimizer expects. (XLA, --jit_compile, is checked
by benchmarks/train_step.py --jit_compile: compiling even a tiny U-Net takes tens of seconds
on the 2-core machines, too slow for the suite.)"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf import losses
from uda_tf.methods import GRL, SourceOnly
from uda_tf.methods.base import SegmentationMethod
from uda_tf.models.discriminators import domain_classifier
from uda_tf.methods.schedules import LambdaSchedule


@pytest.fixture
def policy():
    """Set a global dtype policy for one test and restore float32 afterwards."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _method(name):
    seg = tiny_segmentor(seed=0)
    if name == "grl":
        keras.utils.set_random_seed(1)
        clf = domain_classifier(seg.output["features"].shape[1:], hidden=(8, 8))
        model = GRL(seg, CLASS_NAMES, domain_classifier=clf,
                    lambda_schedule=LambdaSchedule("constant", 1.0, 10))
        model.compile(seg=keras.optimizers.Adam(1e-3), disc=keras.optimizers.Adam(1e-3))
    else:
        model = SourceOnly(seg, CLASS_NAMES)
        model.compile(seg=keras.optimizers.Adam(1e-3))
    model.build_optimizers()
    return model


def _fit(model, name, steps=2):
    x_s, y_s, x_t = tiny_batch(n=4)
    element = ((x_s, y_s), x_t) if name == "grl" else (x_s, y_s)
    ds = tf.data.Dataset.from_tensors(element).repeat()
    return model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0).history


# float16 (GPU policy, loss-scaled) for both methods; bfloat16 (CPU policy) for GRL.
@pytest.mark.parametrize("name,dtype", [("source_only", "mixed_float16"),
                                        ("grl", "mixed_float16"), ("grl", "mixed_bfloat16")])
def test_mixed_precision_step_is_finite_and_float32_outside(policy, name, dtype):
    policy(dtype)
    model = _method(name)
    for opt in model.all_optimizers():  # float16 scales every optimizer; bfloat16 none
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer) == (dtype == "mixed_float16")
    assert len(model.all_optimizers()) == (2 if name == "grl" else 1)
    before = [v.numpy() for v in model.trainable_variables]
    logs = _fit(model, name, steps=3)
    for key, values in logs.items():
        assert np.isfinite(values).all(), (key, values)
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    moved = [float(np.abs(v.numpy() - b).max()) for v, b in zip(model.trainable_variables, before)]
    assert max(moved) > 0, "no update: every step was skipped"
    x_s, _, _ = tiny_batch(n=2)
    out = model.segmentor(x_s)
    assert out["logits"].dtype == tf.float32
    assert out["features"].dtype == tf.as_dtype(dtype.split("_")[1])  # computed in low precision
    if name == "grl":
        assert model.domain_classifier(out["features"]).dtype == tf.float32
        # both sub-networks were updated, so neither optimizer skipped every step
        n_clf = len(model.domain_classifier.trainable_variables)
        assert max(moved[-n_clf:]) > 0 and max(moved[:-n_clf]) > 0


def test_optimizer_gradients_scale_per_optimizer():
    seg = tiny_segmentor(seed=0)
    x_s, y_s, _ = tiny_batch(n=2)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=64.0)
    plain = keras.optimizers.SGD(0.1)
    enc = [v for v in seg.trainable_variables if v.path.startswith("enc0")]
    dec = [v for v in seg.trainable_variables if v.path.startswith("dec0")]
    with tf.GradientTape(persistent=True) as tape:
        logits = seg(x_s, training=True)["logits"]
        loss = tf.reduce_mean(losses.dice_ce_loss(y_s, logits))
    g_enc, g_dec = SegmentationMethod.optimizer_gradients(tape, loss, (scaled, enc),
                                                          (plain, dec))
    ref_enc, ref_dec = tape.gradient(loss, enc), tape.gradient(loss, dec)
    for g, r in zip(g_enc, ref_enc):
        np.testing.assert_allclose(g.numpy(), 64.0 * r.numpy(), rtol=1e-5, atol=1e-7)
    for g, r in zip(g_dec, ref_dec):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["adversarial", "self_training"])
def test_mixed_float16_for_the_other_target_methods(policy, name):
    """Every optimizer of the alternating adversarial method (segmentor and each
    discriminator) and of self-training is loss-scaled under float16, and steps stay finite."""
    policy("mixed_float16")
    x_s, y_s, x_t = tiny_batch(n=4)
    if name == "adversarial":
        from tests.methods.test_adversarial import tiny_adversarial
        model = tiny_adversarial(1.0, ("feature", "entropy"), patch=False, adv_loss="wgan-gp")
        expected = 3
    else:
        from uda_tf.methods.self_training import SelfTraining
        seg = tiny_segmentor(seed=0)
        model = SelfTraining(seg, CLASS_NAMES, teacher=keras.models.clone_model(seg),
                             threshold=0.0, warmup=False, minent_weight=0.1)
        model.compile(seg=keras.optimizers.Adam(1e-3))
        model.build_optimizers()
        expected = 1
    optimizers = model.all_optimizers()
    assert len(optimizers) == expected
    assert all(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in optimizers)
    before = [v.numpy() for v in model.trainable_variables]
    logs = model.fit(tf.data.Dataset.from_tensors(((x_s, y_s), x_t)).repeat(), epochs=1,
                     steps_per_epoch=3, verbose=0).history
    for key, values in logs.items():
        assert np.isfinite(values).all(), (key, values)
    moved = [float(np.abs(v.numpy() - b).max()) for v, b in zip(model.trainable_variables, before)]
    assert max(moved) > 0
