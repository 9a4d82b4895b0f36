"""Every use of Keras internals (private methods and attributes) in uda_tf, in one place.

Each is a workaround for an upstream bug or a missing public hook, verified on the Keras
version pinned in constraints.txt; tests/test_keras_compat.py fails when Keras changes under one
of them. Drop a workaround when its upstream issue is fixed and the test says so.

MultiWorkerMirroredStrategy with Keras 3 `fit` fails in two places (keras #20585):

1. `Trainer._maybe_symbolic_build` takes the first distributed batch and reduces it across
   workers (`strategy.reduce("MEAN", batch)`) to build the model symbolically, even when every
   layer and optimizer is already built. A model built before `fit` (layers, and every
   optimizer, keras #20164) needs no symbolic build at all, so it is skipped
   (`needs_symbolic_build`).
2. `reduce_per_replica` reduces every log value with `strategy.reduce("MEAN", v, axis=0)` in
   multi-worker mode, which fails on a scalar (there is no axis 0). Logs are therefore shaped
   [1] in multi-worker mode (`shaped_step`); the reduction then averages the workers' values
   back into a scalar. On one machine logs stay scalars (there Keras stacks and averages them).

`FitHooks` below hooks both in (with the validation-metrics fix), and every method derives
from it through `SegmentationMethod` (methods/base.py), so every registered method gets them;
the two-worker test (tests/cli/test_multiworker_cli.py: the six-optimizer AttENT method
through train.py, bit-identical weights on both workers) shows they suffice.
"""
from __future__ import annotations

import functools

import keras
import tensorflow as tf


def in_multi_worker_mode(strategy) -> bool:
    """Whether `strategy` spans several workers: the same test Keras's `reduce_per_replica`
    makes before it takes the cross-worker reduction that needs shaped logs."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


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
    layers_built = model.built and all(layer.built for layer in all_layers(model))
    return not (layers_built and all(opt.built for opt in model.all_optimizers()))


def all_layers(model) -> list:
    """Every layer inside `model`, nested models' layers included, `model` itself not.
    Keras 3 has no public recursive walk (`model.layers` lists the top level only); this is
    `Layer._flatten_layers`, which Keras itself uses for the same purpose."""
    return list(model._flatten_layers(include_self=False))


class FitHooks(keras.Model):
    """The base of every uda_tf method (methods/base.py): Keras `fit` and `evaluate` with the
    overrides of private Trainer hooks uda_tf needs, all of them here."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # keras #20585, item 1: skipped for a model already built with its optimizers.
        if needs_symbolic_build(self):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function):
        # keras #20585, item 2: logs shaped [1] in multi-worker mode.
        return super()._make_function(shaped_step(step_function, self.distribute_strategy))

    def _get_metrics_result_or_logs(self, logs):
        """Keras reports the metrics' own results (their variables, summed over every replica
        and worker when read) only when a step returns exactly `self.metrics`' keys; otherwise
        it keeps the last step's logs, which under a strategy are each replica's *local*
        results averaged over the replicas. A method's `test_step` returns the validation
        metrics only (a GRL also tracks domain_loss, ...), so on several replicas val_dice was
        the mean of per-replica Dice, not the Dice of the validation set. Take the metrics'
        results for the keys the step returned (keras/src/trainers/trainer.py)."""
        metric_logs = self.get_metrics_result()
        if isinstance(logs, dict) and logs and set(logs) <= set(metric_logs):
            return {name: metric_logs[name] for name in logs}
        return super()._get_metrics_result_or_logs(logs)
