"""Schedules for the adaptation weight lambda, evaluated inside train_step from the step."""
from __future__ import annotations

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
