"""Adaptation steps around training rather than inside train_step: fine-tuning from a
checkpoint with frozen layers, and AdaBN.

* `--init_checkpoint` + `--freeze_layers`: start from a segmentor trained elsewhere (typically a
  source-only run's best.weights.h5) and keep the matched layers fixed. Shirokikh et al. (DART
  2020) found the first U-Net layers carry the most domain-specific information, so the usual
  choice is to fine-tune the early encoder blocks and freeze the rest, or the reverse to adapt
  only the decoder; a regular expression over layer names covers both.
* `--adabn`: after training, replace every BatchNormalization layer's moving statistics with
  statistics of target images (Li et al., "Revisiting batch normalization for practical domain
  adaptation", ICLR-W 2017): the weights stay, only the normalisation moves to the target.
"""
from __future__ import annotations

import itertools
import re

import keras

from uda_tf import keras_compat


def load_init_checkpoint(segmentor: keras.Model, path: str) -> None:
    """Load segmentor weights from `path` (a `.weights.h5` file written by train.py), with an
    error naming --init_checkpoint when the file is missing or the architecture differs."""
    import os
    if not path.endswith(".weights.h5"):
        raise ValueError(f"--init_checkpoint={path}: expected a segmentor weights file "
                         "ending in .weights.h5 (e.g. runs/<run>/checkpoints/best.weights.h5)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_checkpoint={path}: no such file")
    try:
        segmentor.load_weights(path)
    except (ValueError, KeyError) as err:
        raise ValueError(f"--init_checkpoint={path} does not fit this segmentor (was it "
                         f"trained with the same --base_filters, --norm and data?): {err}") from None


def freeze_layers(segmentor: keras.Model, pattern: str) -> list[str]:
    """Set `trainable = False` on every layer whose name matches the regular expression
    `pattern` (re.match, anchored at the start); returns their names. A pattern that matches
    no layer with weights is an error listing the names it could have matched."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--freeze_layers={pattern!r} is not a regular expression: {err}") \
            from None
    weighted = [layer for layer in segmentor.layers if layer.weights]
    frozen = [layer.name for layer in weighted if regex.match(layer.name)]
    if not frozen:
        names = ", ".join(layer.name for layer in weighted)
        raise ValueError(f"--freeze_layers={pattern!r} matches no layer with weights; the "
                         f"segmentor's are: {names}")
    for layer in weighted:
        if layer.name in frozen:
            layer.trainable = False
    return frozen


def batchnorm_layers(model: keras.Model) -> list:
    return [layer for layer in keras_compat.all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization)]


def reestimate_batchnorm(segmentor: keras.Model, images, max_batches: int) -> int:
    """AdaBN: set every BatchNormalization layer's moving mean and variance to the average of
    its batch statistics over up to `max_batches` batches of `images` (an iterable of image
    batches from the target domain). Returns the number of batches used.

    The running average is exact: at batch k (0-based) the layer's momentum is k / (k + 1), so
    moving = (k * moving + batch) / (k + 1). The variance is the mean of per-batch variances
    (as PyTorch's cumulative BatchNorm average), which slightly under-counts the spread of
    batch means; with batches of a dozen slices or more the difference is small. Runs eagerly
    (momentum is read at call time) and in training mode, so each layer sees activations
    normalised by target statistics upstream, as in AdaBN.
    """
    if max_batches < 1:
        raise ValueError(f"--adabn_batches must be >= 1, got {max_batches}")
    layers = batchnorm_layers(segmentor)
    if not layers:
        raise ValueError("--adabn re-estimates BatchNormalization statistics, but the segmentor "
                         "has none: train with --norm=batch")
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    count = 0
    try:
        for layer in layers:
            layer.trainable = True  # frozen BN layers run in inference mode and update nothing
        for batch in itertools.islice(images, max_batches):
            for layer in layers:
                layer.momentum = count / (count + 1.0)
            segmentor(batch, training=True)
            count += 1
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum, layer.trainable = momentum, trainable
    if count == 0:
        raise ValueError("--adabn: the target domain gave no training images")
    return count
