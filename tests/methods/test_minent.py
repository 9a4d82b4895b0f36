"""MinEnt: the target-entropy term, as the `minent` method and added by the base class to any
method that sees target images (here GRL), checked against a hand-computed SGD step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf import losses
from uda_tf.methods import GRL, MinEnt, SourceOnly
from uda_tf.models.discriminators import domain_classifier
from uda_tf.methods.schedules import LambdaSchedule

LR, W = 0.1, 0.5


def _fit_one(model, x_s, y_s, x_t):
    return model.fit(tf.data.Dataset.from_tensors(((x_s, y_s), x_t)), epochs=1,
                     steps_per_epoch=1, verbose=0).history


def _gradients(seg, x_s, y_s, x_t):
    with tf.GradientTape(persistent=True) as tape:
        logits = seg(tf.concat([x_s, x_t], 0), training=True)["logits"]
        sup = tf.reduce_mean(losses.dice_ce_loss(y_s, logits[:len(x_s)]))
        ent = tf.reduce_mean(losses.mean_entropy(logits[len(x_s):]))
    return tape.gradient(sup, seg.trainable_variables), tape.gradient(ent,
                                                                      seg.trainable_variables)


def _mean_target_entropy(seg, x_t):
    return float(tf.reduce_mean(losses.mean_entropy(seg(x_t, training=True)["logits"])))


def test_minent_step_descends_supervised_plus_weighted_target_entropy():
    x_s, y_s, x_t = tiny_batch()
    seg0 = tiny_segmentor(seed=0)
    g_sup, g_ent = _gradients(seg0, x_s, y_s, x_t)
    model = MinEnt(tiny_segmentor(seed=0), CLASS_NAMES, minent_weight=W)
    model.compile(seg=keras.optimizers.SGD(LR))
    model.build_optimizers()
    logs = _fit_one(model, x_s, y_s, x_t)
    for v0, v, gs, ge in zip(seg0.trainable_variables, model.segmentor.trainable_variables,
                             g_sup, g_ent):
        np.testing.assert_allclose(v.numpy() - v0.numpy(), -LR * (gs + W * ge).numpy(),
                                   atol=1e-6, rtol=1e-3, err_msg=v.path)
    assert 0.0 <= logs["ent_loss"][-1] <= 1.0
    np.testing.assert_allclose(logs["ent_loss"][-1], _mean_target_entropy(seg0, x_t), rtol=1e-5)
    # As a user sees it: target predictions are more confident than after the same step
    # without the entropy term.
    plain = keras.models.clone_model(seg0)
    plain.set_weights(seg0.get_weights())
    for v, g in zip(plain.trainable_variables, g_sup):
        v.assign_sub(LR * g)
    assert _mean_target_entropy(model.segmentor, x_t) < _mean_target_entropy(plain, x_t)


def _grl(minent_weight):
    seg = tiny_segmentor(seed=0)
    keras.utils.set_random_seed(1)
    clf = domain_classifier(seg.output["features"].shape[1:], hidden=(8, 8))
    model = GRL(seg, CLASS_NAMES, domain_classifier=clf,
                lambda_schedule=LambdaSchedule("constant", 0.5, 10),
                minent_weight=minent_weight)
    model.compile(seg=keras.optimizers.SGD(LR), disc=keras.optimizers.SGD(LR))
    model.build_optimizers()
    return model


def test_minent_weight_adds_the_same_term_to_another_method():
    x_s, y_s, x_t = tiny_batch()
    _, g_ent = _gradients(tiny_segmentor(seed=0), x_s, y_s, x_t)
    with_ent, without = _grl(W), _grl(0.0)
    logs = _fit_one(with_ent, x_s, y_s, x_t)
    _fit_one(without, x_s, y_s, x_t)
    for a, b, g in zip(with_ent.segmentor.trainable_variables,
                       without.segmentor.trainable_variables, g_ent):
        np.testing.assert_allclose(a.numpy() - b.numpy(), -LR * W * g.numpy(), atol=1e-6,
                                   rtol=1e-3, err_msg=a.path)
    assert "ent_loss" in logs


def test_minent_flags_are_checked():
    with pytest.raises(ValueError, match=r"--minent_weight=0.1 needs a method that sees target"):
        SourceOnly(tiny_segmentor(), CLASS_NAMES, minent_weight=0.1)
    with pytest.raises(ValueError, match=r"--method=minent needs --minent_weight > 0"):
        MinEnt.configure({"dice_weight": 1.0, "class_weights": None, "minent_weight": 0.0})
