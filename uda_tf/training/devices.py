"""Device set-up and the choice of tf.distribute strategy."""
from __future__ import annotations

import json
import os

import tensorflow as tf

#: --cluster values: where the multi-worker cluster comes from ("auto": TF_CONFIG if it names
#: a cluster, else SLURM if this process is one of several tasks of a Slurm job step)
CLUSTERS = ("auto", "tf_config", "slurm", "none")


def split_cpu(n: int) -> None:
    """Split the host CPU into `n` logical devices (for MirroredStrategy on a CPU machine).

    Must run before TensorFlow initialises its devices; calling it again afterwards with at
    most as many devices as were made is a no-op (`mirrored_cpus(n)` takes the first `n`),
    with more it is an error.
    """
    if n < 1:
        raise ValueError(f"number of CPU devices must be >= 1, got {n}")
    cpus = tf.config.list_physical_devices("CPU")
    configured = tf.config.get_logical_device_configuration(cpus[0]) or []
    if len(configured) >= n:  # (before initialisation too: never split into fewer)
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < n:
            raise RuntimeError(
                f"cannot split the CPU into {n} devices: TensorFlow already initialised "
                f"{have}") from err


def make_strategy(num_cpu_devices: int = 1, *, cluster: str = "auto",
                  slurm_port_base: int = 8888) -> tf.distribute.Strategy:
    """The strategy for this process.

    Several workers (a cluster from TF_CONFIG or SLURM, see `cluster_resolver`):
    MultiWorkerMirroredStrategy over every worker's GPUs (or its CPU). One machine:
    MirroredStrategy over all visible GPUs; on a CPU-only machine over `num_cpu_devices`
    logical CPUs (one device -> OneDeviceStrategy, which has no all-reduce overhead)."""
    resolver = cluster_resolver(cluster, slurm_port_base=slurm_port_base)
    if resolver is not None:
        if num_cpu_devices > 1:
            raise ValueError(f"--num_cpu_devices={num_cpu_devices} cannot be combined with a "
                             "multi-worker cluster; each worker uses its own GPUs or its CPU")
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
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


def mixed_precision_policy() -> str:
    """The Keras dtype policy for --mixed_precision on this machine.

    GPU: "mixed_float16" (tensor cores; needs loss scaling, see methods/base.py). CPU:
    "mixed_bfloat16": TensorFlow's CPU float16 convolutions fall back to Eigen kernels and are
    slower than float32 (a 3x3 convolution on 8x96x112x16: 12 ms float16, 8 ms float32, 6 ms
    bfloat16 through oneDNN on the 2-core development machines), and bfloat16 has float32's
    exponent range, so it needs no loss scaling."""
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def _tf_config_cluster() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("cluster") or {}
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster' key: {raw[:200]!r}") \
            from err


def _slurm_tasks() -> int:
    """Tasks of the current Slurm job step (1 outside `srun`)."""
    if "SLURM_PROCID" not in os.environ:
        return 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)


def cluster_resolver(cluster: str = "auto", *, slurm_port_base: int = 8888):
    """The multi-worker cluster this process belongs to, or None to train on one machine.

    `cluster` (the --cluster flag): "tf_config" reads the TF_CONFIG environment variable,
    "slurm" the Slurm job step (`srun`), "none" ignores both, and "auto" takes TF_CONFIG if it
    names a cluster with more than one task, else Slurm if the step has more than one task."""
    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster={cluster!r}: expected one of {CLUSTERS}")
    if cluster == "none":
        return None
    tasks = sum(len(v) for v in _tf_config_cluster().values())
    if cluster == "tf_config" or (cluster == "auto" and tasks > 1):
        if tasks == 0:
            raise ValueError("--cluster=tf_config, but TF_CONFIG names no cluster; set it to "
                             '{"cluster": {"worker": ["host:port", ...]}, '
                             '"task": {"type": "worker", "index": i}}')
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if cluster == "slurm" or (cluster == "auto" and _slurm_tasks() > 1):
        if "SLURM_PROCID" not in os.environ:
            raise ValueError("--cluster=slurm, but this process was not started by srun "
                             "(SLURM_PROCID is not set)")
        kwargs = {}
        if not tf.config.list_physical_devices("GPU"):
            # The resolver deals GPUs out to tasks: on a CPU node it runs nvidia-smi (not
            # found), and with gpus_per_node=0 fails on range(0, 0, 0). Give every task a
            # nominal device id instead and leave CUDA_VISIBLE_DEVICES alone.
            kwargs = dict(gpus_per_node=1024, gpus_per_task=1, auto_set_gpu=False)
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=slurm_port_base, **kwargs)
    return None
