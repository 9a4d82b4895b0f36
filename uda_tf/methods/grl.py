"""GRL / DANN on encoder features (Ganin et al., JMLR 2016) or on the output space.

One forward pass of the segmentor on the concatenated source and target batch; the bottleneck
features go through a gradient reversal layer into a domain classifier. Minimising
    supervised(source) + beta * BCE(domain_classifier(GRL_lambda(features)), domain)
trains the classifier to tell the domains apart while the reversed gradient pushes the encoder
towards features the classifier cannot separate. With `--grl_features=output` the classifier is
a CNN on the softmax maps instead (Javanmardi & Tasdizen, ISBI 2018), so the reversed gradient
reaches the whole segmentor, decoder included.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import register
from uda_tf.methods.base import SegmentationMethod, split_batch
from uda_tf.methods.settings import setting
from uda_tf.models import heads
from uda_tf.models.discriminators import domain_classifier, output_domain_classifier
from uda_tf.models.layers import GradientReversal
from uda_tf.methods.schedules import LAMBDA_SCHEDULES, LambdaSchedule


GRL_FEATURES = ("bottleneck", "encoder", "output")
#: not a segmentor output: its class probabilities (softmax, or [1 - p, p] for a sigmoid head),
#: computed in train_step
OUTPUT_KEY = "probabilities"


def feature_keys(segmentor, which: str) -> list[str]:
    """Segmentor outputs the domain classifier sees: the bottleneck alone, or every encoder
    level (each skip connection's features) plus the bottleneck, or the class-probability
    output maps."""
    if which == "bottleneck":
        return ["features"]
    if which == "encoder":
        return sorted(k for k in segmentor.output if k.startswith("encoder")) + ["features"]
    if which == "output":
        return [OUTPUT_KEY]
    raise ValueError(f"unknown GRL features {which!r}; expected one of {GRL_FEATURES}")


@register("grl")
class GRL(SegmentationMethod):
    uses_target = True

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        grl_lambda: float = setting(1.0, "GRL: maximum gradient-reversal factor lambda.",
                                    lower=0)
        lambda_schedule: str = setting(
            "dann", "GRL: lambda over training: the DANN ramp 2/(1+exp(-10p))-1 or constant.",
            choices=LAMBDA_SCHEDULES)
        grl_features: str = setting(
            "bottleneck", "GRL: features the domain classifier sees: the bottleneck, or every "
            "encoder level (skip connections) and the bottleneck.", choices=GRL_FEATURES)
        domain_loss_weight: float = setting(1.0, "GRL: weight beta of the domain loss.",
                                            lower=0)

    def __init__(self, segmentor, class_names, *, domain_classifier: keras.Model,
                 lambda_schedule: LambdaSchedule, domain_loss_weight: float = 1.0,
                 feature_keys=("features",), **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        self.domain_classifier = domain_classifier
        self.feature_keys = list(feature_keys)
        self.lambda_schedule = lambda_schedule
        self.domain_loss_weight = float(domain_loss_weight)
        self.grl = GradientReversal(name="grl")
        self.domain_loss_tracker = keras.metrics.Mean(name="domain_loss")
        self.domain_acc_tracker = keras.metrics.Mean(name="domain_acc")

    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        keys = feature_keys(segmentor, config.grl_features)
        if keys == [OUTPUT_KEY]:
            # K class-probability maps, also for a sigmoid head's single logit (K = 2)
            classifier = output_domain_classifier(
                tuple(segmentor.output["logits"].shape[1:-1]) + (len(class_names),))
        else:
            classifier = domain_classifier([segmentor.output[k].shape[1:] for k in keys])
        return cls(segmentor, class_names, **cls.base_kwargs(config, class_names),
                   domain_classifier=classifier, feature_keys=keys,
                   lambda_schedule=LambdaSchedule(config.lambda_schedule, config.grl_lambda,
                                                  run.epochs * run.steps_per_epoch),
                   domain_loss_weight=config.domain_loss_weight)

    def optimizer_targets(self):
        return {"seg": self.segmentor, "disc": self.domain_classifier}

    @property
    def metrics(self):
        return super().metrics + [self.domain_loss_tracker, self.domain_acc_tracker]

    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        n_s = tf.shape(x_s)[0]
        lam = self.lambda_schedule(self.seg_optimizer.iterations)
        with tf.GradientTape(persistent=True) as tape:  # two backward passes under float16
            out = self.segmentor(tf.concat([x_s, x_t], axis=0), training=True)
            if OUTPUT_KEY in self.feature_keys:
                out = {**out, OUTPUT_KEY: heads.class_probabilities(out["logits"])}
            seg = self.supervised_loss(y_s, out["logits"][:n_s])
            ent = self.minent_loss(out["logits"][n_s:])
            reversed_features = [self.grl(out[k], lam=lam) for k in self.feature_keys]
            if len(reversed_features) == 1:
                reversed_features = reversed_features[0]
            domain_logits = self.domain_classifier(reversed_features, training=True)
            is_source = tf.concat([tf.ones([n_s]), tf.zeros([tf.shape(x_t)[0]])], axis=0)
            dom = losses.binary_cross_entropy(is_source, domain_logits)
            loss = (losses.replica_mean(seg) + losses.replica_mean(ent)
                    + self.domain_loss_weight * losses.replica_mean(dom))
        # The reversal already flipped the encoder's share of the domain gradient, so both
        # sub-networks simply descend on the same total: one backward pass, or one per
        # optimizer's loss scale under mixed float16.
        self.apply_update(tape, loss, "seg", "disc")

        predicted_source = tf.cast(tf.reshape(domain_logits, [-1]) > 0, tf.float32)
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        self.domain_loss_tracker.update_state(tf.reduce_mean(dom))
        self.domain_acc_tracker.update_state(
            tf.reduce_mean(tf.cast(tf.equal(predicted_source, is_source), tf.float32)))
        return {"seg_loss": self.seg_loss_tracker.result(),
                "domain_loss": self.domain_loss_tracker.result(),
                "domain_acc": self.domain_acc_tracker.result(),
                "ent_loss": self.ent_loss_tracker.result(),
                "lambda": lam}
