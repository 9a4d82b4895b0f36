"""Losses. Every function returns one value per sample ([N]); the caller reduces with
`replica_mean`, so a global batch split across replicas gives the same gradient as one device.
"""
from __future__ import annotations

import math

import tensorflow as tf

from uda_tf.models import heads


def replica_mean(per_sample):
    """Per-replica share of the global-batch mean: sum / (per-replica batch x replicas).

    Gradients are summed across replicas by the optimizer, so this is what makes N replicas
    equal one device (docs/DESIGN.md, distribution)."""
    return tf.nn.compute_average_loss(per_sample)


def _spatial_axes(tensor, channels_last: bool = True) -> list[int]:
    """The spatial axes of [N, *spatial, C] (or [N, *spatial] labels): 2D and 3D alike."""
    return list(range(1, len(tensor.shape) - (1 if channels_last else 0)))


def soft_dice_loss(labels, probs, *, smooth: float = 1.0, include_background: bool = False,
                   class_weights=None):
    """1 - soft Dice per sample, averaged over classes (Milletari et al., V-Net, 2016).

    labels: int [N, *spatial]; probs: float [N, *spatial, C] (2D or 3D). Dice is computed per
    sample (not over the batch) so that it is additive over samples and independent of the
    replica split. `class_weights` (one per class, background first) make the class average a
    weighted mean: sum_c w_c Dice_c / sum_c w_c over the classes included.
    """
    num_classes = probs.shape[-1]
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=probs.dtype)
    weights = None if class_weights is None else tf.constant(class_weights, probs.dtype)
    if not include_background:
        onehot, probs = onehot[..., 1:], probs[..., 1:]
        weights = None if weights is None else weights[1:]
    axes = _spatial_axes(probs)
    intersection = tf.reduce_sum(onehot * probs, axes)
    denominator = tf.reduce_sum(onehot, axes) + tf.reduce_sum(probs, axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if weights is None:
        return 1.0 - tf.reduce_mean(dice, axis=-1)
    return 1.0 - tf.reduce_sum(dice * weights, -1) / tf.reduce_sum(weights)


def cross_entropy(labels, logits, *, class_weights=None):
    """Pixel-wise cross-entropy, averaged over the pixels (voxels) of each sample: softmax CE
    for K logits, sigmoid BCE for one logit (models.heads). `class_weights` scale each pixel's
    term by the weight of its true class (the mean stays over all pixels, as Keras'
    class_weight does, so weights [1, ..., 1] give the unweighted loss)."""
    labels = tf.cast(labels, tf.int32)
    ce = pixel_cross_entropy(labels, logits)
    if class_weights is not None:
        ce = ce * tf.gather(tf.constant(class_weights, tf.float32), labels)
    return tf.reduce_mean(ce, axis=_spatial_axes(ce, channels_last=False))


def pixel_cross_entropy(labels, logits):
    """Cross-entropy per pixel (voxel), [N, *spatial]: softmax CE for K logits, sigmoid BCE
    for one logit (models.heads); `labels` are integer class maps [N, *spatial]."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    if heads.is_sigmoid(logits):
        return tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.float32), logits=logits[..., 0])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def dice_ce_loss(labels, logits, *, dice_weight: float = 1.0, class_weights=None):
    """Cross-entropy + dice_weight x soft Dice loss, per sample (the usual nnU-Net pairing).
    Softmax or sigmoid head after the logits' channel count; 2D or 3D."""
    logits = tf.cast(logits, tf.float32)
    probs = heads.class_probabilities(logits)
    return (cross_entropy(labels, logits, class_weights=class_weights)
            + dice_weight * soft_dice_loss(labels, probs, class_weights=class_weights))


def binary_cross_entropy(targets, logits):
    """Sigmoid BCE per sample; `logits` [N, 1] or [N], `targets` broadcastable floats."""
    logits = tf.reshape(tf.cast(logits, tf.float32), [-1])
    targets = tf.reshape(tf.cast(targets, tf.float32), [-1])
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)


def entropy_map(probs, eps: float = 1e-12):
    """Shannon entropy of the class distribution per pixel, divided by log C so it lies in
    [0, 1] (as in AdvEnt, Vu et al. 2019). probs: [..., C] -> [...]."""
    num_classes = probs.shape[-1]
    ent = -tf.reduce_sum(probs * tf.math.log(probs + eps), axis=-1)
    return ent / math.log(num_classes)


# -- adversarial losses (issue 4) -------------------------------------------------------------
# A discriminator's output is a logit or score per sample ([N, 1]) or, for a fully
# convolutional patch discriminator, a map of them ([N, h, w, 1]); `label` is 1 for "source"
# and 0 for "target". The same function serves both players: the discriminator update passes
# the true domain, the segmentor update passes flipped labels (target presented as source).

ADVERSARIAL_LOSSES = ("bce", "lsgan", "wgan-gp")


def _per_sample_map_mean(values):
    """Mean over every axis but the first: one value per sample for global or patch outputs."""
    values = tf.cast(values, tf.float32)
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def adversarial_loss(outputs, label, kind: str):
    """Per-sample adversarial loss of discriminator `outputs` against domain `label` (0 or 1).

    - `bce`: sigmoid cross-entropy, the original minimax GAN game (Goodfellow et al., NeurIPS
      2014, eq. 1), as used for the feature and entropy discriminators of entropy-guided UDA
      (Zeng et al., MICCAI 2020) and AdvEnt (Vu et al., CVPR 2019, eqs. 7-8).
    - `lsgan`: least squares (D(x) - label)^2 (Mao et al., ICCV 2017, eq. 2 with a = 0,
      b = c = 1; the 1/2 factors are dropped).
    - `wgan-gp`: the critic's Wasserstein terms (Gulrajani et al., NeurIPS 2017, eq. 3, without
      the penalty, which is `gradient_penalty`): -D(x) for label 1 and +D(x) for label 0, so the
      critic loss is E_t[D] - E_s[D] and the segmentor's flipped loss is -E_t[D], as in
      PnP-AdaNet (Dou et al., IEEE Access 2019).
    For patch outputs the value is averaged over the map of each sample.
    """
    outputs = tf.cast(outputs, tf.float32)
    label = tf.cast(label, tf.float32)
    if kind == "bce":
        values = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.broadcast_to(label, tf.shape(outputs)), logits=outputs)
    elif kind == "lsgan":
        values = tf.square(outputs - label)
    elif kind == "wgan-gp":
        values = (1.0 - 2.0 * label) * outputs
    else:
        raise ValueError(f"unknown adversarial loss {kind!r}; expected one of "
                         f"{ADVERSARIAL_LOSSES}")
    return _per_sample_map_mean(values)


def gradient_penalty(critic, source, target, epsilon):
    """WGAN-GP gradient penalty per sample (Gulrajani et al., NeurIPS 2017, eq. 3):
    (||grad_x D(x_hat)||_2 - 1)^2 at x_hat = eps * source + (1 - eps) * target.

    `critic` maps [N, ...] to [N, 1] or a patch map [N, h, w, 1] (averaged per sample);
    `source` and `target` are paired samples of the same shape; `epsilon` [N] in [0, 1] is
    passed in so that the caller can draw it replica-invariantly. Samples must not interact
    inside the critic (no batch normalisation), so the gradient of the summed scores with
    respect to x_hat is each sample's own gradient.
    """
    source = tf.cast(source, tf.float32)
    target = tf.cast(target, tf.float32)
    eps = tf.reshape(tf.cast(epsilon, tf.float32), [-1] + [1] * (source.shape.rank - 1))
    mixed = eps * source + (1.0 - eps) * target
    with tf.GradientTape() as tape:
        tape.watch(mixed)
        scores = tf.reduce_sum(_per_sample_map_mean(critic(mixed)))
    grads = tape.gradient(scores, mixed)
    norms = tf.sqrt(tf.reduce_sum(tf.reshape(tf.square(grads), [tf.shape(grads)[0], -1]), 1)
                    + 1e-12)
    return tf.square(norms - 1.0)


def mean_entropy(logits):
    """Per-sample mean of the normalised entropy map: the MinEnt loss of AdvEnt (Vu et al.,
    CVPR 2019, eq. 3, with entropy divided by log C so that it lies in [0, 1]). Softmax or
    sigmoid head (a sigmoid logit is a two-class distribution, normalised by log 2)."""
    return _per_sample_map_mean(entropy_map(heads.class_probabilities(logits)))
