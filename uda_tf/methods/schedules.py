"""Schedules: the adaptation weight lambda (evaluated inside train_step from the step) and the
learning rates of the sub-networks' optimizers."""
from __future__ import annotations

import keras
import tensorflow as tf

LAMBDA_SCHEDULES = ("dann", "constant")


def dann_ramp(progress):
    """2 / (1 + exp(-10 p)) - 1: lambda grows from 0 to 1 as training progress p goes 0 -> 1
    (Ganin et al., JMLR 2016, section 5.2.2), damping the noisy early domain signal."""
    return 2.0 / (1.0 + tf.exp(-10.0 * progress)) - 1.0


class LambdaSchedule:
    """lambda(step) = max_value x shape(step / total_steps), with shape `dann` or `constant`."""

    def __init__(self, kind: str, max_value: float, total_steps: int):
        if kind not in LAMBDA_SCHEDULES:
            raise ValueError(f"unknown lambda schedule {kind!r}; expected one of {LAMBDA_SCHEDULES}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.kind, self.max_value, self.total_steps = kind, float(max_value), int(total_steps)

    def __call__(self, step):
        if self.kind == "constant":
            return tf.constant(self.max_value, tf.float32)
        progress = tf.minimum(tf.cast(step, tf.float32) / float(self.total_steps), 1.0)
        return self.max_value * dann_ramp(progress)

    def get_config(self):
        return {"kind": self.kind, "max_value": self.max_value, "total_steps": self.total_steps}


# -- learning-rate schedules ----------------------------------------------------------------
# The shapes are Keras' own (keras.optimizers.schedules), evaluated by each optimizer at its own
# step counter, so every sub-network (segmentor, domain classifier) follows its own schedule.
# Warm-up is ours: Keras' CosineDecay warms up *before* its decay (the decay then starts at
# warmup_steps) and from a start value upwards, and its other schedules have no warm-up. Here
# warm-up multiplies any shape by min(1, (step + 1) / warmup_steps): linear from
# lr/warmup_steps at the first step to the full rate at step warmup_steps - 1, so even the
# first step moves the weights (Goyal et al. 2017, "Accurate, large minibatch SGD", gradual
# warm-up), and the shape keeps counting from step 0 (the values train.py always gave).


@keras.saving.register_keras_serializable(package="uda_tf")
class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule` (a Keras LearningRateSchedule, or a constant rate) times the linear warm-up
    factor min(1, (step + 1) / warmup_steps); warmup_steps 0: the schedule itself."""

    def __init__(self, schedule, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {warmup_steps}")
        if isinstance(schedule, dict):  # from get_config
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule, self.warmup_steps = schedule, int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            rate = tf.cast(self.schedule(step), tf.float32)
        else:
            rate = tf.constant(float(self.schedule), tf.float32)
        if self.warmup_steps:
            rate *= tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return rate

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = keras.optimizers.schedules.serialize(schedule)
        return {"schedule": schedule, "warmup_steps": self.warmup_steps}


def _constant(learning_rate, total_steps, steps_per_epoch, decay):
    return float(learning_rate)


def _step(learning_rate, total_steps, steps_per_epoch, decay):
    """lr x decay^floor(step / steps_per_epoch): the per-epoch x0.75 decay used by
    entropy-guided UDA on CC-359 (the default `--lr_decay`)."""
    return keras.optimizers.schedules.ExponentialDecay(
        learning_rate, decay_steps=steps_per_epoch, decay_rate=decay, staircase=True)


def _poly(learning_rate, total_steps, steps_per_epoch, decay):
    """lr x (1 - t/T)^0.9, nnU-Net's poly schedule (Isensee et al. 2021)."""
    return keras.optimizers.schedules.PolynomialDecay(
        learning_rate, decay_steps=total_steps, end_learning_rate=0.0, power=0.9)


def _cosine(learning_rate, total_steps, steps_per_epoch, decay):
    """lr x (1 + cos(pi t/T)) / 2 (Loshchilov & Hutter 2017, SGDR, without restarts)."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps,
                                                  alpha=0.0)


#: --lr_schedule values and the Keras schedule each one makes
LR_SCHEDULES = {"constant": _constant, "step": _step, "poly": _poly, "cosine": _cosine}


def lr_schedule(kind: str, learning_rate: float, *, total_steps: int, steps_per_epoch: int,
                decay: float = 0.75, warmup_steps: int = 0) -> Warmup:
    """The `kind` schedule (a LR_SCHEDULES name) peaking at `learning_rate`, with warm-up."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; expected one of "
                         f"{', '.join(LR_SCHEDULES)}")
    if learning_rate < 0:
        raise ValueError(f"learning rate must be >= 0, got {learning_rate}")
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"total_steps and steps_per_epoch must be >= 1, got {total_steps} "
                         f"and {steps_per_epoch}")
    if kind == "step" and not 0 < decay <= 1:
        raise ValueError(f"step decay needs 0 < --lr_decay <= 1, got {decay}")
    shape = LR_SCHEDULES[kind](float(learning_rate), int(total_steps), int(steps_per_epoch),
                               float(decay))
    return Warmup(shape, warmup_steps)


def learning_rates(run, method_config):
    """(segmentor schedule, discriminator schedule): --lr_schedule at --learning_rate, and
    --disc_lr_schedule (`same`: the segmentor's shape) at --disc_learning_rate, both with
    --warmup_steps and --lr_decay. `run` holds the optimisation settings (epochs,
    steps_per_epoch, learning_rate, lr_schedule, lr_decay, warmup_steps); `method_config` the
    method's (disc_learning_rate, disc_lr_schedule)."""
    common = dict(total_steps=run.epochs * run.steps_per_epoch,
                  steps_per_epoch=run.steps_per_epoch, decay=run.lr_decay,
                  warmup_steps=run.warmup_steps)
    seg = lr_schedule(run.lr_schedule, run.learning_rate, **common)
    disc_kind = method_config.disc_lr_schedule
    disc = lr_schedule(run.lr_schedule if disc_kind == "same" else disc_kind,
                       method_config.disc_learning_rate, **common)
    return seg, disc
