"""Every registered method, built from flags as train.py builds it, trains a step on a 3D
softmax segmentor and on a 2D sigmoid (binary) segmentor: the discriminators and domain
classifiers take the segmentor's rank, entropy maps and class probabilities come from the head
(a sigmoid logit is a two-class distribution), and entropies stay in [0, 1]."""
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import METHODS
from uda_tf.methods.adversarial import entropy_input
from uda_tf.models.unet import residual_unet

SHAPE_3D = (16, 16, 8, 1)
SHAPE_2D = (16, 16, 1)


def _cfg(**overrides):
    """Every value a method's `configure` and `build` read (train.py's flag names)."""
    values = dict(dice_weight=1.0, class_weights=None, minent_weight=0.1, seed=0,
                  learning_rate=1e-3, disc_learning_rate=1e-3, jit_compile=False, epochs=1,
                  steps_per_epoch=2, lr_schedule="constant", disc_lr_schedule="same",
                  lr_decay=0.75, warmup_steps=0,
                  grl_features="bottleneck", grl_lambda=1.0, lambda_schedule="constant",
                  domain_loss_weight=1.0,
                  adv_discriminators="both", patch_discriminators=False, adv_loss="bce",
                  adv_feature_weight=0.1, adv_entropy_weight=0.1, adv_both_domains=True,
                  disc_steps=1, gp_weight=10.0,
                  pseudo_label_criterion="entropy", pseudo_label_threshold=0.9,
                  pseudo_label_weight=1.0, self_training_round_epochs=1, init_checkpoint="")
    values.update(overrides)
    return SimpleNamespace(**values)


def _data(shape, num_classes, n=2, seed=0):
    rng = np.random.default_rng(seed)
    x_s = rng.random((n, *shape), dtype=np.float32)
    y_s = (x_s[..., 0] > 0.5).astype(np.uint8) if num_classes == 2 else \
        np.digitize(x_s[..., 0], [0.4, 0.7]).astype(np.uint8)
    x_t = (0.5 + 0.5 * rng.random((n, *shape))).astype(np.float32)
    return x_s, y_s, x_t


CASES = [  # (method, flag overrides, segmentors): each method on both; a variant whose
    # rank- and head-dependent code another case already runs, on the 3D one only
    ("source_only", {"minent_weight": 0.0}, ("3d_softmax", "2d_sigmoid")),
    ("minent", {}, ("3d_softmax", "2d_sigmoid")),
    ("grl", {"grl_features": "bottleneck"}, ("3d_softmax", "2d_sigmoid")),
    ("grl", {"grl_features": "encoder"}, ("3d_softmax",)),
    ("grl", {"grl_features": "output"}, ("3d_softmax", "2d_sigmoid")),
    ("adversarial", {}, ("3d_softmax", "2d_sigmoid")),
    ("adversarial", {"patch_discriminators": True, "adv_loss": "wgan-gp", "disc_steps": 2},
     ("3d_softmax",)),
    ("self_training", {}, ("3d_softmax", "2d_sigmoid")),
]
SEGMENTORS = {  # name: (input shape, classes, logit channels)
    "3d_softmax": (SHAPE_3D, 3, 3),
    "2d_sigmoid": (SHAPE_2D, 2, 1),
}


@pytest.mark.parametrize("method,overrides,segmentor", [
    (m, o, s) for m, o, segmentors in CASES for s in segmentors],
    ids=[f"{m}-{'-'.join(f'{v}' for v in o.values()) or 'default'}-{s}"
         for m, o, segmentors in CASES for s in segmentors])
@pytest.mark.slow
def test_method_trains_on_3d_and_sigmoid_segmentors(method, overrides, segmentor):
    shape, num_classes, channels = SEGMENTORS[segmentor]
    keras.utils.set_random_seed(0)
    seg = residual_unet(shape, channels, base_filters=4, depth=2, norm="instance")
    names = ["background", "fg"] if num_classes == 2 else ["background", "a", "b"]
    cfg = _cfg(**overrides)
    model = METHODS[method].build(seg, names, METHODS[method].configure(vars(cfg)), cfg)
    rank = len(shape) - 1
    for sub in (getattr(model, a, None) for a in ("domain_classifier", "feature_disc",
                                                  "entropy_disc")):
        if sub is not None:  # discriminators take the segmentor's spatial rank
            assert len(sub.inputs[0].shape) == rank + 2, (sub.name, sub.inputs[0].shape)
    x_s, y_s, x_t = _data(shape, num_classes)
    element = (x_s, y_s) if method == "source_only" else ((x_s, y_s), x_t)
    before = [v.numpy() for v in model.trainable_variables]
    logs = model.fit(tf.data.Dataset.from_tensors(element).repeat(), epochs=1,
                     steps_per_epoch=2, verbose=0).history
    for key, values in logs.items():
        assert np.isfinite(values).all(), (key, values)
    seg_moved = max(float(np.abs(v.numpy() - b).max())
                    for v, b in zip(model.segmentor.trainable_variables, before))
    assert seg_moved > 0
    if "ent_loss" in logs:  # the target entropy is real for either head: not 0, at most 1
        assert 0.0 < logs["ent_loss"][-1] <= 1.0, logs["ent_loss"]
    if method == "adversarial":
        for name in model.disc_names:  # every discriminator was updated in its own step
            disc = model._disc(name)
            assert disc.trainable_variables and "d_loss_" + name in logs
    if method == "grl" and overrides["grl_features"] == "output":
        # the output classifier sees K class-probability maps, also for one sigmoid logit
        assert model.domain_classifier.inputs[0].shape[-1] == num_classes


def test_entropy_of_a_sigmoid_logit_is_the_binary_entropy_over_log2():
    logits = tf.constant([[[[0.0], [3.0]], [[-2.0], [50.0]]]])  # [1, 2, 2, 1]
    p = tf.sigmoid(logits)[..., 0].numpy()
    expected = -(p * np.log(p + 1e-12) + (1 - p) * np.log(1 - p + 1e-12)) / np.log(2.0)
    np.testing.assert_allclose(entropy_input(logits)[..., 0], expected, atol=1e-5)
    assert float(entropy_input(logits)[0, 0, 0, 0]) == pytest.approx(1.0)  # p = 0.5: maximal
    np.testing.assert_allclose(losses.mean_entropy(logits), [expected.mean()], atol=1e-5)
