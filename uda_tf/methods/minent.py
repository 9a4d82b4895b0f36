"""MinEnt: supervised training on source plus direct entropy minimisation on target (Vu et al.,
"ADVENT: Adversarial Entropy Minimization for Domain Adaptation in Semantic Segmentation",
CVPR 2019, section 3.1, eq. 3).

The entropy term itself is the base class's `minent_loss`, which every method that sees target
images applies with --minent_weight; this method is that term on its own: one forward pass on
concat(source, target), Dice + CE on the source half and weighted mean entropy on the target
half.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import register
from uda_tf.methods.base import SegmentationMethod, split_batch


@register("minent")
class MinEnt(SegmentationMethod):
    uses_target = True

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        def check(self):
            if self.minent_weight <= 0:
                # Without the term this would be source-only training at twice the cost.
                raise ValueError("--method=minent needs --minent_weight > 0 (AdvEnt used "
                                 f"1e-3), got {self.minent_weight}")

    def __init__(self, segmentor, class_names, **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        self.Config(minent_weight=self.minent_weight).check()

    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        n_s = tf.shape(x_s)[0]
        with tf.GradientTape() as tape:
            logits = self.segmentor(tf.concat([x_s, x_t], axis=0), training=True)["logits"]
            seg = self.supervised_loss(y_s, logits[:n_s])
            ent = self.minent_loss(logits[n_s:])
            loss = losses.replica_mean(seg) + losses.replica_mean(ent)
        self.apply_update(tape, loss, "seg")
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        return {"seg_loss": self.seg_loss_tracker.result(),
                "ent_loss": self.ent_loss_tracker.result()}
