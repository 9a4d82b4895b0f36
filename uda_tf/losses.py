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
    equal one device (shared/ARCHITECTURE.md, loss scaling)."""
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
    logits = tf.cast(logits, tf.float32)
    if heads.is_sigmoid(logits):
        ce = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.float32), logits=logits[..., 0])
    else:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    if class_weights is not None:
        ce = ce * tf.gather(tf.constant(class_weights, tf.float32), labels)
    return tf.reduce_mean(ce, axis=_spatial_axes(ce, channels_last=False))


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
