"""Device set-up and the choice of tf.distribute strategy."""
from __future__ import annotations

import tensorflow as tf


def split_cpu(n: int) -> None:
    """Split the host CPU into `n` logical devices (for MirroredStrategy on a CPU machine).

    Must run before TensorFlow initialises its devices; calling it again with the same `n`
    afterwards is a no-op, a different `n` is an error.
    """
    if n < 1:
        raise ValueError(f"number of CPU devices must be >= 1, got {n}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise RuntimeError(
                f"cannot split the CPU into {n} devices: TensorFlow already initialised "
                f"{have}") from err


def make_strategy(num_cpu_devices: int = 1) -> tf.distribute.Strategy:
    """MirroredStrategy over all visible GPUs; on a CPU-only machine over `num_cpu_devices`
    logical CPUs (one device -> OneDeviceStrategy, which has no all-reduce overhead)."""
    # Physical, not logical: listing logical devices would initialise them, and then the CPU
    # could no longer be split.
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    if num_cpu_devices > 1:
        return mirrored_cpus(num_cpu_devices)
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def mirrored_cpus(n: int) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over `n` logical CPUs. Reduction goes through one device rather than
    collective ops: several strategies created in one process (as in a test session) would
    otherwise share collective instance keys and abort with shape mismatches."""
    split_cpu(n)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")][:n]
    return tf.distribute.MirroredStrategy(
        cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
