"""Source-only: supervised training on the labelled source domain; the baseline."""
from __future__ import annotations

import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import register
from uda_tf.methods.base import SegmentationMethod, split_batch


@register("source_only")
class SourceOnly(SegmentationMethod):
    uses_target = False

    def train_step(self, data):
        x_s, y_s, _ = split_batch(data)
        with tf.GradientTape() as tape:
            logits = self.segmentor(x_s, training=True)["logits"]
            seg = self.supervised_loss(y_s, logits)
            loss = losses.replica_mean(seg)
        self.apply_update(tape, loss, "seg")
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        return {"seg_loss": self.seg_loss_tracker.result()}
