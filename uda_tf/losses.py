"""Losses. Every function returns one value per sample ([N]); the caller reduces with
`replica_mean`, so a global batch split across replicas gives the same gradient as one device.
"""
from __future__ import annotations

import math

import tensorflow as tf


def replica_mean(per_sample):
    """Per-replica share of the global-batch mean: sum / (per-replica batch x replicas).

    Gradients are summed across replicas by the optimizer, so this is what makes N replicas
    equal one device (shared/ARCHITECTURE.md, loss scaling)."""
    return tf.nn.compute_average_loss(per_sample)


def soft_dice_loss(labels, probs, *, smooth: float = 1.0, include_background: bool = False):
    """1 - soft Dice per sample, averaged over classes (Milletari et al., V-Net, 2016).

    labels: int [N, H, W]; probs: float [N, H, W, C]. Dice is computed per sample (not over the
    batch) so that it is additive over samples and independent of the replica split.
    """
    num_classes = probs.shape[-1]
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=probs.dtype)
    if not include_background:
        onehot, probs = onehot[..., 1:], probs[..., 1:]
    axes = [1, 2]
    intersection = tf.reduce_sum(onehot * probs, axes)
    denominator = tf.reduce_sum(onehot, axes) + tf.reduce_sum(probs, axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def cross_entropy(labels, logits):
    """Pixel-wise softmax cross-entropy, averaged over pixels of each sample."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits)
    return tf.reduce_mean(ce, axis=[1, 2])


def dice_ce_loss(labels, logits, *, dice_weight: float = 1.0):
    """Cross-entropy + dice_weight x soft Dice loss, per sample (the usual nnU-Net pairing)."""
    logits = tf.cast(logits, tf.float32)
    probs = tf.nn.softmax(logits, axis=-1)
    return cross_entropy(labels, logits) + dice_weight * soft_dice_loss(labels, probs)


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
