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

`SegmentationMethod` (methods/base.py) hooks both in, so every registered method gets them;
the two-worker tests (tests/methods/test_multiworker.py, tests/cli/test_multiworker_cli.py)
show they suffice.
"""
from __future__ import annotations

import functools

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
