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

import keras
import tensorflow as tf

from uda_tf import losses
from uda_tf.methods.base import SegmentationMethod, loss_scaled, split_batch
from uda_tf.models import heads
from uda_tf.models.discriminators import domain_classifier, output_domain_classifier
from uda_tf.models.layers import GradientReversal
from uda_tf.methods.schedules import LambdaSchedule, learning_rates_from_flags


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


class GRL(SegmentationMethod):
    uses_target = True

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
    def from_flags(cls, segmentor, class_names, cfg):
        keys = feature_keys(segmentor, cfg.grl_features)
        if keys == [OUTPUT_KEY]:
            # K class-probability maps, also for a sigmoid head's single logit (K = 2)
            classifier = output_domain_classifier(
                tuple(segmentor.output["logits"].shape[1:-1]) + (len(class_names),))
        else:
            classifier = domain_classifier([segmentor.output[k].shape[1:] for k in keys])
        return cls(segmentor, class_names, **cls.supervised_kwargs(cfg, class_names),
                   **cls.target_kwargs(cfg),
                   domain_classifier=classifier, feature_keys=keys,
                   lambda_schedule=LambdaSchedule(cfg.lambda_schedule, cfg.grl_lambda,
                                                  cfg.epochs * cfg.steps_per_epoch),
                   domain_loss_weight=cfg.domain_loss_weight)

    def compile_from_flags(self, cfg):
        seg_lr, disc_lr = learning_rates_from_flags(cfg)
        self.compile(keras.optimizers.Adam(seg_lr), keras.optimizers.Adam(disc_lr),
                     jit_compile=cfg.jit_compile)

    def compile(self, seg_optimizer, disc_optimizer, **kwargs):
        super().compile(seg_optimizer, **kwargs)
        self.disc_optimizer = loss_scaled(disc_optimizer)

    def build_optimizers(self):
        super().build_optimizers()
        self.disc_optimizer.build(self.domain_classifier.trainable_variables)

    @property
    def metrics(self):
        return super().metrics + [self.domain_loss_tracker, self.domain_acc_tracker]

    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        n_s = tf.shape(x_s)[0]
        lam = self.lambda_schedule(self.seg_optimizer.iterations)
        seg_vars = self.segmentor.trainable_variables
        disc_vars = self.domain_classifier.trainable_variables
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
        seg_grads, disc_grads = self.optimizer_gradients(
            tape, loss, (self.seg_optimizer, seg_vars), (self.disc_optimizer, disc_vars))
        self.seg_optimizer.apply_gradients(zip(seg_grads, seg_vars))
        self.disc_optimizer.apply_gradients(zip(disc_grads, disc_vars))

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
