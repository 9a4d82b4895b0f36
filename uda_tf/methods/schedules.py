"""Schedules: the adaptation weight lambda (evaluated inside train_step from the step) and the
learning rates of the sub-networks' optimizers."""
from __future__ import annotations

import math

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
# Each is a keras LearningRateSchedule (serialisable: get_config / from_config, registered under
# the package "uda_tf") evaluated by the optimizer at its own step counter, so every sub-network
# (segmentor, domain classifier) follows its own schedule on its own optimizer.
# Warm-up multiplies the shape by min(1, (step + 1) / warmup_steps): linear from lr/warmup_steps
# at the first step to the full rate at step warmup_steps - 1, so even the first step moves the
# weights (Goyal et al. 2017, "Accurate, large minibatch SGD", gradual warm-up).


class _WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, learning_rate: float, warmup_steps: int = 0):
        if learning_rate < 0:
            raise ValueError(f"learning rate must be >= 0, got {learning_rate}")
        if warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {warmup_steps}")
        self.learning_rate, self.warmup_steps = float(learning_rate), int(warmup_steps)

    def shape(self, step):
        """The schedule without warm-up, as a factor of `learning_rate` (step: float32)."""
        raise NotImplementedError

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        factor = self.shape(step)
        if self.warmup_steps:
            factor *= tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return self.learning_rate * factor

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="uda_tf")
class ConstantLR(_WarmupSchedule):
    """lr(step) = learning_rate (after warm-up)."""

    def shape(self, step):
        return tf.ones_like(step)


@keras.saving.register_keras_serializable(package="uda_tf")
class StepDecayLR(_WarmupSchedule):
    """lr = learning_rate x decay^epoch, epoch = floor(step / steps_per_epoch): the per-epoch
    x0.75 decay used by entropy-guided UDA on CC-359 (the default `--lr_decay`)."""

    def __init__(self, learning_rate, steps_per_epoch: int, decay: float = 0.75,
                 warmup_steps: int = 0):
        super().__init__(learning_rate, warmup_steps)
        if steps_per_epoch < 1 or not 0 < decay <= 1:
            raise ValueError(f"step decay needs steps_per_epoch >= 1 and 0 < --lr_decay <= 1, "
                             f"got {steps_per_epoch} and {decay}")
        self.steps_per_epoch, self.decay = int(steps_per_epoch), float(decay)

    def shape(self, step):
        return tf.pow(self.decay, tf.floor(step / float(self.steps_per_epoch)))

    def get_config(self):
        return {**super().get_config(), "steps_per_epoch": self.steps_per_epoch,
                "decay": self.decay}


class _DecayToEnd(_WarmupSchedule):
    def __init__(self, learning_rate, total_steps: int, warmup_steps: int = 0):
        super().__init__(learning_rate, warmup_steps)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def progress(self, step):
        return tf.minimum(step / float(self.total_steps), 1.0)

    def get_config(self):
        return {**super().get_config(), "total_steps": self.total_steps}


@keras.saving.register_keras_serializable(package="uda_tf")
class PolyLR(_DecayToEnd):
    """lr = learning_rate x (1 - t/T)^0.9, nnU-Net's poly schedule (Isensee et al. 2021)."""

    def shape(self, step):
        return tf.pow(1.0 - self.progress(step), 0.9)


@keras.saving.register_keras_serializable(package="uda_tf")
class CosineLR(_DecayToEnd):
    """lr = learning_rate x (1 + cos(pi t/T)) / 2 (Loshchilov & Hutter 2017, SGDR, without
    restarts)."""

    def shape(self, step):
        return 0.5 * (1.0 + tf.cos(math.pi * self.progress(step)))


LR_SCHEDULES = {"constant": ConstantLR, "step": StepDecayLR, "poly": PolyLR, "cosine": CosineLR}


def lr_schedule(kind: str, learning_rate: float, *, total_steps: int, steps_per_epoch: int,
                decay: float = 0.75, warmup_steps: int = 0) -> _WarmupSchedule:
    """The `kind` schedule (a LR_SCHEDULES name) peaking at `learning_rate`."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; expected one of "
                         f"{', '.join(LR_SCHEDULES)}")
    cls = LR_SCHEDULES[kind]
    if cls is StepDecayLR:
        return cls(learning_rate, steps_per_epoch, decay, warmup_steps)
    if issubclass(cls, _DecayToEnd):
        return cls(learning_rate, total_steps, warmup_steps)
    return cls(learning_rate, warmup_steps)


def learning_rates_from_flags(cfg):
    """(segmentor schedule, discriminator schedule) from resolved flags: --lr_schedule at
    --learning_rate, and --disc_lr_schedule (`same`: the segmentor's shape) at
    --disc_learning_rate, both with --warmup_steps and --lr_decay. Flags an older config lacks
    take their defaults (constant, no warm-up)."""
    kind = getattr(cfg, "lr_schedule", "constant")
    disc_kind = getattr(cfg, "disc_lr_schedule", "same")
    common = dict(total_steps=cfg.epochs * cfg.steps_per_epoch,
                  steps_per_epoch=cfg.steps_per_epoch, decay=getattr(cfg, "lr_decay", 0.75),
                  warmup_steps=getattr(cfg, "warmup_steps", 0))
    seg = lr_schedule(kind, cfg.learning_rate, **common)
    disc = lr_schedule(kind if disc_kind == "same" else disc_kind,
                       getattr(cfg, "disc_learning_rate", cfg.learning_rate), **common)
    return seg, disc
