"""Multi-worker training: which worker writes what.

The Keras workarounds that make `fit` work under MultiWorkerMirroredStrategy at all
(keras #20585) live in uda_tf/keras_compat.py.

Every worker runs the same `fit` with the same callbacks (all of them take part in every
all-reduce, and reading a distributed metric variable, as a training backup does, is one), but
only the chief tracks in MLflow, exports and evaluates; the others write their checkpoints and
backups to a temporary directory that is removed afterwards, as the TF multi-worker guide
prescribes (https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras).
"""
from __future__ import annotations

import shutil
import tempfile

from uda_tf.keras_compat import in_multi_worker_mode



def num_workers(strategy) -> int:
    """Workers (input pipelines) of `strategy`; 1 on one machine."""
    if not in_multi_worker_mode(strategy):
        return 1
    return cluster_size(strategy.cluster_resolver)


def cluster_size(resolver) -> int:
    """Workers (chief included) a cluster resolver names, read without connecting to them;
    1 for None (one machine)."""
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, ())) for job in ("chief", "worker"))


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (checkpoints, export, MLflow)."""
    return bool(strategy.extended.should_checkpoint)






def worker_dir(run_dir: str | None, strategy) -> str:
    """`run_dir` on the chief; a fresh temporary directory on the other workers, so that they
    never write into the run (remove it with `cleanup_worker_dir`)."""
    if is_chief(strategy):
        return run_dir
    resolver = strategy.cluster_resolver
    return tempfile.mkdtemp(prefix=f"uda_tf-{resolver.task_type}{resolver.task_id}-")


def cleanup_worker_dir(path: str, strategy) -> None:
    """Remove a non-chief worker's temporary directory (the chief's run stays)."""
    if not is_chief(strategy):
        shutil.rmtree(path, ignore_errors=True)
