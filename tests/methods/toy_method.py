"""A method defined the way a new one is added: this one module, registered by its decorator.

Source-only training plus a weighted L2 penalty on the segmentor's logits (its own setting,
--toy_l2_weight), and a second sub-network with its own optimizer: a linear probe that learns
the foreground fraction of each source batch from the (detached) bottleneck features. The
probe exists to exercise the optimizer bookkeeping a real second sub-network needs (built
before fit, backed up, resumed, its gradient norm guarded) without any other file knowing it.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import register
from uda_tf.methods.base import SegmentationMethod, split_batch
from uda_tf.methods.settings import setting


@register("toy")
class ToyMethod(SegmentationMethod):
    uses_target = False

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        toy_l2_weight: float = setting(
            0.01, "toy: weight of the L2 penalty on the segmentor's logits.", lower=0)

    def __init__(self, segmentor, class_names, *, probe: keras.Model, l2_weight: float,
                 **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        self.probe = probe
        self.l2_weight = float(l2_weight)
        self.probe_loss_tracker = keras.metrics.Mean(name="probe_loss")

    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        features = keras.Input(segmentor.output["features"].shape[1:])
        probe = keras.Model(features, keras.layers.Dense(1)(keras.layers.Flatten()(features)),
                            name="probe")
        return cls(segmentor, class_names, **cls.base_kwargs(config, class_names),
                   probe=probe, l2_weight=config.toy_l2_weight)

    def optimizer_targets(self):
        return {"seg": self.segmentor, "probe": self.probe}

    @property
    def metrics(self):
        return super().metrics + [self.probe_loss_tracker]

    def train_step(self, data):
        x_s, y_s, _ = split_batch(data)
        # 1. the segmentor: Dice + CE + l2_weight x mean squared logit
        with tf.GradientTape() as tape:
            out = self.segmentor(x_s, training=True)
            seg = self.supervised_loss(y_s, out["logits"])
            l2 = tf.reduce_mean(tf.square(out["logits"]),
                                axis=list(range(1, len(out["logits"].shape))))
            loss = losses.replica_mean(seg) + self.l2_weight * losses.replica_mean(l2)
        self.apply_update(tape, loss, "seg")
        # 2. the probe: foreground fraction from the detached features
        fraction = tf.reduce_mean(tf.cast(y_s > 0, tf.float32),
                                  axis=list(range(1, len(y_s.shape))))
        with tf.GradientTape() as tape:
            predicted = self.probe(tf.stop_gradient(out["features"]), training=True)[:, 0]
            probe = tf.square(predicted - fraction)
            probe_loss = losses.replica_mean(probe)
        self.apply_update(tape, probe_loss, "probe")
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        self.probe_loss_tracker.update_state(tf.reduce_mean(probe))
        return {"seg_loss": self.seg_loss_tracker.result(),
                "probe_loss": self.probe_loss_tracker.result()}
