"""Segmentation metrics: a streaming Dice for validation during training, and volume Dice.

Empty-mask rule (volume Dice): when a class is absent from both prediction and reference the
Dice is 1 and the case is flagged `both_empty`; when it is absent from only one, Dice is 0.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class StreamingDice(keras.metrics.Metric):
    """Dice per class accumulated over every pixel seen since the last reset (pooled over the
    validation set, so small slices do not dominate). `result()` returns a dict:
    `dice` (mean over foreground classes) and `dice_<name>` per foreground class."""

    def __init__(self, class_names, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.intersection = self.add_variable((n,), initializer="zeros", name="intersection")
        self.pred_total = self.add_variable((n,), initializer="zeros", name="pred_total")
        self.true_total = self.add_variable((n,), initializer="zeros", name="true_total")

    def update_state(self, labels, logits, sample_weight=None):
        n = len(self.class_names)
        pred = tf.one_hot(tf.argmax(logits, axis=-1), n, dtype=tf.float32)
        true = tf.one_hot(tf.cast(labels, tf.int32), n, dtype=tf.float32)
        axes = list(range(len(pred.shape) - 1))
        self.intersection.assign_add(tf.reduce_sum(pred * true, axes))
        self.pred_total.assign_add(tf.reduce_sum(pred, axes))
        self.true_total.assign_add(tf.reduce_sum(true, axes))

    def result(self):
        denom = self.pred_total + self.true_total
        dice = tf.where(denom > 0, 2.0 * self.intersection / tf.maximum(denom, 1.0), 1.0)
        out = {self.name: tf.reduce_mean(dice[1:])}
        for i, cls in enumerate(self.class_names[1:], start=1):
            out[f"{self.name}_{cls}"] = dice[i]
        return out

    def reset_state(self):
        for v in (self.intersection, self.pred_total, self.true_total):
            v.assign(tf.zeros_like(v))


def volume_dice(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[float, bool]:
    """Dice of class `label` between two label volumes; returns (dice, both_empty)."""
    p, r = pred == label, ref == label
    ps, rs = int(p.sum()), int(r.sum())
    if ps == 0 and rs == 0:
        return 1.0, True
    return 2.0 * int(np.logical_and(p, r).sum()) / (ps + rs), False
