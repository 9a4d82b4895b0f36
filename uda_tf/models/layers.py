"""Layers shared by the methods: gradient reversal and normalisation choice."""
from __future__ import annotations

import math

import keras
import tensorflow as tf


@tf.custom_gradient
def reverse_gradient(x, lam):
    """Identity forward; multiplies the incoming gradient by -lam backward (Ganin & Lempitsky,
    "Unsupervised Domain Adaptation by Backpropagation", ICML 2015, eq. 13)."""
    def grad(dy):
        return -tf.cast(lam, dy.dtype) * dy, tf.zeros_like(lam)
    return tf.identity(x), grad


class GradientReversal(keras.layers.Layer):
    """Gradient reversal layer. `lam` is passed per call so a schedule can ramp it from the
    optimizer's step counter inside `train_step`, identically on every replica."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.build(None)  # stateless; an unbuilt layer makes Keras re-trace the wrapper at fit

    def call(self, inputs, lam=1.0):
        lam = tf.convert_to_tensor(lam, dtype=inputs.dtype)
        return reverse_gradient(inputs, lam)


NORMALIZATIONS = ("instance", "batch", "group")
GROUPS = 8  # group norm: Wu & He (ECCV 2018) found 8-32 groups about equal; small nets need few


def normalization(kind: str, *, sync: bool = False, name: str | None = None,
                  channels: int | None = None):
    """Normalisation layer by name.

    `instance` (nnU-Net's default) and `group` normalise each sample on its own, so the update
    does not depend on how the global batch is split across replicas. `batch` uses
    cross-replica (synchronised) statistics when `sync` is set. With `channels` given, group
    norm uses the largest divisor of `channels` up to 8 groups (tiny test networks have 2-4
    channels, which 8 groups cannot split).
    """
    if kind == "instance":
        return keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)
    if kind == "group":
        groups = GROUPS if channels is None else math.gcd(GROUPS, int(channels))
        return keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, name=name)
    if kind == "batch":
        return keras.layers.BatchNormalization(synchronized=sync, name=name)
    raise ValueError(f"unknown normalization {kind!r}; expected one of {NORMALIZATIONS}")
