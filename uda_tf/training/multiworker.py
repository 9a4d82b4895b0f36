"""MultiWorkerMirroredStrategy with Keras 3 `fit`: the upstream workarounds, in one place, and
which worker writes what.

Keras 3 `fit` under MultiWorkerMirroredStrategy fails in two places (keras #20585):

1. `Trainer._maybe_symbolic_build` takes the first distributed batch and reduces it across
   workers (`strategy.reduce("MEAN", batch)`) to build the model symbolically, even when every
   layer and optimizer is already built. The reduction is a collective on integer labels and
   an extra batch; a model built before `fit` (layers, and every optimizer through
   `SegmentationMethod.build_optimizers`, keras #20164) needs no symbolic build at all, so it
   is skipped (`needs_symbolic_build`).
2. `reduce_per_replica` reduces every log value with `strategy.reduce("MEAN", v, axis=0)` in
   multi-worker mode, which fails on a scalar (there is no axis 0). Logs are therefore shaped
   [1] in multi-worker mode (`shaped_step`); the reduction then averages the workers' values
   back into a scalar. On one machine logs stay scalars (there Keras stacks and averages them).

`SegmentationMethod` (methods/base.py) hooks both in, so every registered method gets them.
The two-worker test (tests/methods/test_multiworker.py) trains GRL and the adversarial method
on 127.0.0.1 and checks the workers end with identical weights; drop these workarounds when
that test passes without them. tests/test_multiworker_cli.py runs train.py itself as two
workers.

Writing: every worker runs the same `fit` with the same callbacks (all of them take part in
every all-reduce, and reading a distributed metric variable, as a training backup does, is one),
but only the chief tracks in MLflow, exports and evaluates; the others write their checkpoints
and backups to a temporary directory that is removed afterwards, as the TF multi-worker guide
prescribes
(https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras).
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile

import tensorflow as tf


def in_multi_worker_mode(strategy) -> bool:
    """Whether `strategy` spans several workers: the same test Keras's `reduce_per_replica`
    makes before it takes the cross-worker reduction that needs shaped logs."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def num_workers(strategy) -> int:
    """Workers (input pipelines) of `strategy`; 1 on one machine."""
    if not in_multi_worker_mode(strategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, ())) for job in ("chief", "worker"))


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (checkpoints, export, MLflow)."""
    return bool(strategy.extended.should_checkpoint)


def shaped_step(step_function, strategy):
    """`step_function` (a `train_step` or `test_step`) returning its logs shaped [1] in
    multi-worker mode (keras #20585, item 2); on one machine `step_function` itself."""
    if not in_multi_worker_mode(strategy):
        return step_function

    @functools.wraps(step_function)
    def step(data):
        return {name: tf.reshape(value, [1]) for name, value in step_function(data).items()}

    return step


def needs_symbolic_build(model) -> bool:
    """False when every layer and every optimizer of `model` is built, so that Keras's
    symbolic build (and its cross-worker reduction of a data batch) can be skipped
    (keras #20585, item 1). `model.all_optimizers()` lists the method's optimizers."""
    layers_built = model.built and all(layer.built for layer in model._flatten_layers())
    return not (layers_built and all(opt.built for opt in model.all_optimizers()))


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
