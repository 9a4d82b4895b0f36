"""Adversarial method: step 1 trains each discriminator on detached outputs with source = 1 and
target = 0 and leaves the segmentor alone; step 2 moves the segmentor by Dice + CE plus lambda x
the discriminators' losses with flipped labels and leaves the discriminators alone. Checked
against a hand-computed SGD step."""
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, SHAPE, tiny_batch, tiny_segmentor
from uda_tf import losses
from uda_tf.methods import Adversarial
from uda_tf.methods.adversarial import entropy_input
from uda_tf.models.discriminators import entropy_discriminator, feature_discriminator

LR = 0.1


def tiny_discriminators(seg, names=("feature", "entropy"), patch=False):
    keras.utils.set_random_seed(1)
    discs = {}
    if "feature" in names:
        discs["feature"] = feature_discriminator(seg.output["features"].shape[1:],
                                                 filters=(8, 8, 8), hidden=(8,), patch=patch)
    if "entropy" in names:
        discs["entropy"] = entropy_discriminator(SHAPE[:2] + (1,), filters=(4, 4, 8, 8, 8),
                                                 hidden=(16, 8), patch=patch)
    return discs


def tiny_adversarial(weight=1.0, names=("feature", "entropy"), patch=False, depth=2, **kwargs):
    seg = tiny_segmentor(seed=0, depth=depth)
    discs = tiny_discriminators(seg, names, patch)
    model = Adversarial(seg, CLASS_NAMES, discriminators=discs,
                        adv_weights={"feature": weight, "entropy": 0.5 * weight}, **kwargs)
    model.compile(seg=keras.optimizers.SGD(LR), **{f"{n}_disc": keras.optimizers.SGD(LR) for n in discs})
    model.build_optimizers()
    return model


def _inputs(seg, x):
    out = seg(x, training=True)
    return out, {"feature": out["features"], "entropy": entropy_input(out["logits"])}


@pytest.mark.parametrize("names,kind,patch,both,steps", [
    (("feature", "entropy"), "bce", False, True, 1),
    (("entropy",), "lsgan", True, False, 2),
])
def test_one_step_matches_the_algorithm(names, kind, patch, both, steps):
    x_s, y_s, x_t = tiny_batch()
    n = len(x_s)
    x = tf.concat([x_s, x_t], 0)
    model = tiny_adversarial(1.0, names, patch, adv_loss=kind, both_domains=both,
                             disc_steps=steps, depth=3)  # an adversarial part large enough
    seg0 = tiny_segmentor(seed=0, depth=3)
    discs0 = {k: model._disc(k) for k in names}
    disc_start = {k: [v.numpy() for v in d.trainable_variables] for k, d in discs0.items()}

    # Step 1 by hand: SGD on the discriminator loss with the true domains, on the outputs of
    # the segmentor as it was before the step (no gradient to it).
    _, inputs0 = _inputs(seg0, x)
    expected_discs = {}
    for k in names:
        d = keras.models.clone_model(discs0[k])
        d.set_weights(disc_start[k])
        for _ in range(steps):
            with tf.GradientTape() as tape:
                s = d(inputs0[k])
                loss = (tf.reduce_mean(losses.adversarial_loss(s[:n], 1.0, kind))
                        + tf.reduce_mean(losses.adversarial_loss(s[n:], 0.0, kind)))
            for v, g in zip(d.trainable_variables, tape.gradient(loss, d.trainable_variables)):
                v.assign_sub(LR * g)
        expected_discs[k] = d

    # Step 2 by hand: supervised gradient, and the adversarial gradient through the updated
    # discriminators with flipped labels (and, for the wrong labels, what a bug would give).
    weights = {"feature": 1.0, "entropy": 0.5}
    seg_vars = seg0.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        out, inputs = _inputs(seg0, x)
        sup = tf.reduce_mean(losses.dice_ce_loss(y_s, out["logits"][:n]))
        adv, unflipped = 0.0, 0.0
        for k in names:
            s = expected_discs[k](inputs[k])
            adv += weights[k] * tf.reduce_mean(losses.adversarial_loss(s[n:], 1.0, kind))
            unflipped += weights[k] * tf.reduce_mean(losses.adversarial_loss(s[n:], 0.0, kind))
            if both and k == "feature":
                adv += weights[k] * tf.reduce_mean(losses.adversarial_loss(s[:n], 0.0, kind))
    g_sup, g_adv, g_wrong = (tape.gradient(t, seg_vars) for t in (sup, adv, unflipped))

    model.fit(tf.data.Dataset.from_tensors(((x_s, y_s), x_t)), epochs=1, steps_per_epoch=1,
              verbose=0)

    for k in names:  # the segmentor's update did not touch the discriminators
        for after, want in zip(model._disc(k).trainable_variables,
                               expected_discs[k].trainable_variables):
            np.testing.assert_allclose(after.numpy(), want.numpy(), atol=1e-6, rtol=1e-4)
        moved = max(float(np.abs(a.numpy() - b).max())
                    for a, b in zip(model._disc(k).trainable_variables, disc_start[k]))
        assert moved > 1e-4, f"discriminator {k} did not train"
    # Segmentor: supervised + flipped adversarial gradient, nothing from step 1.
    for v0, v, gs, ga in zip(seg_vars, model.segmentor.trainable_variables, g_sup, g_adv):
        np.testing.assert_allclose(v.numpy() - v0.numpy(), -LR * (gs + ga).numpy(),
                                   atol=2e-6, rtol=1e-3, err_msg=v.path)
    # The adversarial part is large enough that the wrong label would have been caught.
    diff = max(float(tf.reduce_max(tf.abs(a - w))) for a, w in zip(g_adv, g_wrong))
    assert LR * diff > 1e-4


def test_entropy_input_lies_in_unit_interval():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(3, 8, 8, 4)) * np.array([0.0, 1.0, 100.0])[:, None,
                                                                               None, None],
                         tf.float32)
    ent = entropy_input(logits).numpy()
    assert ent.shape == (3, 8, 8, 1) and np.isfinite(ent).all()
    assert ent.min() >= 0.0 and ent.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(ent[0], 1.0, rtol=1e-5)  # equal logits: uniform, maximal
    assert ent[2].mean() < 0.1  # confident logits: near zero


def test_logs_per_discriminator_and_wgan_gp_runs():
    x_s, y_s, x_t = tiny_batch()
    model = tiny_adversarial(1.0, ("feature",), patch=True, adv_loss="wgan-gp",
                             both_domains=True, disc_steps=2)
    logs = model.fit(tf.data.Dataset.from_tensors(((x_s, y_s), x_t)), epochs=1,
                     steps_per_epoch=1, verbose=0).history
    assert set(logs) == {"seg_loss", "ent_loss", "d_loss_feature", "d_acc_feature",
                         "adv_loss_feature", "adv_loss"}
    assert 0.0 <= logs["d_acc_feature"][-1] <= 1.0
    assert all(np.isfinite(v[-1]) for v in logs.values())


def _cfg(**overrides):
    values = dict(dice_weight=1.0, class_weights=None, minent_weight=0.0, adv_discriminators="both",
                  patch_discriminators=False, adv_loss="bce", adv_feature_weight=1e-3,
                  adv_entropy_weight=2e-3, adv_both_domains=False, disc_steps=1, gp_weight=10.0,
                  seed=0, learning_rate=1e-4, disc_learning_rate=1e-4, jit_compile=False,
                  epochs=2, steps_per_epoch=3, lr_schedule="constant", disc_lr_schedule="same",
                  lr_decay=0.75, warmup_steps=0)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("which,patch,expected", [
    ("feature", False, {"feature": (None, 1)}),
    ("entropy", True, {"entropy": (None, 1, 1, 1)}),
    ("both", False, {"feature": (None, 1), "entropy": (None, 1)}),
])
def test_build_makes_the_chosen_discriminators(which, patch, expected):
    cfg = _cfg(adv_discriminators=which, patch_discriminators=patch)
    model = Adversarial.build(tiny_segmentor(), CLASS_NAMES, Adversarial.configure(vars(cfg)),
                              cfg)
    assert model.disc_names == list(expected)
    for name, shape in expected.items():
        assert tuple(model._disc(name).output.shape) == shape
    assert model.adv_weights == {k: {"feature": 1e-3, "entropy": 2e-3}[k] for k in expected}
    optimizers = {id(model.seg_optimizer)} | {id(model._optimizer(n)) for n in expected}
    assert len(optimizers) == 1 + len(expected)  # one optimizer per sub-network


@pytest.mark.parametrize("overrides,message", [
    ({"adv_discriminators": "entropy", "adv_both_domains": True}, "--adv_both_domains"),
    ({"disc_steps": 0}, "--disc_steps"),
    ({"adv_loss": "hinge"}, "--adv_loss='hinge'"),
    ({"minent_weight": -1.0}, "--minent_weight"),
])
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        Adversarial.configure(vars(_cfg(**overrides)))
