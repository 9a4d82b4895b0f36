"""Whole-volume prediction from a model that sees slices (2D) or patches (3D).

Every function takes a `predict_fn(batch) -> probabilities`: batch [N, H, W, C] (2D slices) or
[N, h, w, d, C] (3D patches), float32, channels-last; probabilities [N, ..., K] that sum to 1
over K. A SavedModel's `serving_default` (uda_tf.serving.export) wrapped by `saved_model_fn` is one.

* `predict_slices`: a prepared volume [H, W, D, C] cut into its D slices, predicted in batches.
* `sliding_window`: a volume [H, W, D, C] covered by overlapping patches, each patch's
  probabilities weighted by a Gaussian that favours its centre (nnU-Net, Isensee et al. 2021),
  since a convolutional network sees less context, and is less accurate, near a patch border.
* `flip_tta`: test-time augmentation: the mean of the probabilities over every combination of
  flips along the given axes, each flipped back (nnU-Net's mirroring).
"""
from __future__ import annotations

import itertools
import math

import numpy as np


class ModelInputError(ValueError):
    """The model's input does not fit the data it would be given."""


def _shape_text(shape) -> str:
    return "[" + ", ".join("any" if d is None else str(d) for d in shape) + "]"


def check_model_input(model_shape, data_shape, *, model: str, data: str,
                      patches: bool = False) -> None:
    """ModelInputError naming `model`, `data` and both shapes unless the model's input (without
    the batch axis, None = any size) takes the data's elements: slices [H, W, C] exactly, or
    with `patches` (sliding window over volumes [H, W, D, C]) the same rank and channels, the
    patch size being free.

    Checked before anything is predicted: otherwise a mismatch surfaces inside the model call
    as a TensorFlow error naming neither the model nor the data."""
    model_shape, data_shape = list(model_shape), list(data_shape)
    problem = None
    if len(model_shape) != len(data_shape):
        kinds = {3: "2D slices [H, W, C]", 4: "3D patches [h, w, d, C]"}
        problem = (f"the model takes {kinds.get(len(model_shape), f'rank {len(model_shape)}')}"
                   f", the data are {kinds.get(len(data_shape), f'rank {len(data_shape)}')}")
    elif None not in (model_shape[-1], data_shape[-1]) and model_shape[-1] != data_shape[-1]:
        problem = (f"the model takes {model_shape[-1]} channel(s), the data have "
                   f"{data_shape[-1]}")
    elif not patches:
        wrong = [i for i, (m, d) in enumerate(zip(model_shape[:-1], data_shape[:-1]))
                 if None not in (m, d) and m != d]
        if wrong:
            problem = (f"sizes differ along axis {', '.join(map(str, wrong))} (the model was "
                       "exported with a fixed input size)")
    if problem:
        raise ModelInputError(f"{model} takes input {_shape_text(model_shape)} but {data} "
                              f"gives {_shape_text(data_shape)}: {problem}. Use the model "
                              "trained on this prepared data (or its --manifest).")


def saved_model_fn(serving_fn):
    """`predict_fn` of a SavedModel signature (`uda_tf.serving.export.load_serving_fn`)."""
    return lambda batch: serving_fn(image=np.asarray(batch, np.float32))["probabilities"].numpy()


def flip_tta(predict_fn, axes):
    """A predict_fn that averages `predict_fn` over the 2^len(axes) flip combinations of the
    batch `axes` (e.g. (1, 2) for slices [N, H, W, C]), each flipped back before averaging."""
    axes = tuple(int(a) for a in axes)
    if any(a < 1 for a in axes):
        raise ValueError(f"flip axes are spatial axes of the batch (>= 1), got {axes}")

    def predict(batch):
        batch = np.asarray(batch, np.float32)
        total = None
        for count in range(len(axes) + 1):
            for flipped in itertools.combinations(axes, count):
                probs = np.asarray(predict_fn(np.flip(batch, flipped) if flipped else batch),
                                   np.float32)
                probs = np.flip(probs, flipped) if flipped else probs
                total = probs if total is None else total + probs
        return total / 2 ** len(axes)

    return predict


def _check_volume(volume, rank: int, what: str) -> np.ndarray:
    volume = np.asarray(volume, np.float32)
    if volume.ndim != rank:
        raise ValueError(f"{what}: expected a volume [H, W, D, C], got shape {volume.shape}")
    return volume


def predict_slices(predict_fn, volume, *, batch_size: int = 32, context: int = 0) -> np.ndarray:
    """Probabilities [H, W, D, K] of a prepared volume [H, W, D, C], slice by slice along D.
    `context` = k adds the k neighbouring slices on each side as channels (2.5D models; edge
    slices repeat), as `uda_tf.data.preprocess.slices_with_context` does for training."""
    volume = _check_volume(volume, 4, "predict_slices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    depth = volume.shape[2]
    offsets = np.arange(-context, context + 1)
    out = []
    for start in range(0, depth, batch_size):
        index = np.arange(start, min(start + batch_size, depth))
        neighbours = np.clip(index[:, None] + offsets[None, :], 0, depth - 1)  # [n, 2k+1]
        batch = volume[:, :, neighbours]  # [H, W, n, 2k+1, C]
        batch = np.moveaxis(batch.reshape(*volume.shape[:2], len(index), -1), 2, 0)
        out.append(np.asarray(predict_fn(np.ascontiguousarray(batch)), np.float32))
    return np.moveaxis(np.concatenate(out), 0, 2)


def gaussian_weights(patch_size, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Importance of each voxel of a patch: a Gaussian centred on the patch with sigma =
    sigma_scale x size per axis (nnU-Net's 1/8), scaled to a maximum of 1 and kept above zero
    so that voxels only a patch corner covers still get a prediction."""
    grids = np.ogrid[tuple(slice(0, n) for n in patch_size)]
    exponent = sum(((g - (n - 1) / 2.0) / max(sigma_scale * n, 1e-6)) ** 2
                   for g, n in zip(grids, patch_size))
    weights = np.exp(-0.5 * exponent).astype(np.float32)
    weights /= weights.max()
    return np.maximum(weights, weights[weights > 0].min(), dtype=np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Patch start positions along one axis: the first at 0, the last flush with the end,
    evenly spaced with at most (1 - overlap) x patch between neighbours."""
    if size <= patch:
        return [0]
    step = patch * (1.0 - overlap)
    count = int(math.ceil((size - patch) / step)) + 1
    return sorted({int(round(x)) for x in np.linspace(0, size - patch, count)})


def sliding_window(predict_fn, volume, patch_size, *, overlap: float = 0.5,
                   batch_size: int = 2, gaussian: bool = True, pad_value: float = 0.0,
                   sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Probabilities [H, W, D, K] of a volume [H, W, D, C] from patch predictions.

    Patches of `patch_size` (h, w, d) start every (1 - overlap) x patch along each axis, the
    last one flush with the end; a volume smaller than a patch is padded with `pad_value`
    (the prepared background) and the padding cut off again. Overlapping predictions are
    averaged with Gaussian weights (`gaussian=False`: plain mean)."""
    volume = _check_volume(volume, 4, "sliding_window")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be 3 positive integers, got {patch_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spatial = volume.shape[:3]
    padded_shape = [max(n, p) for n, p in zip(spatial, patch_size)]
    before = [(m - n) // 2 for n, m in zip(spatial, padded_shape)]
    widths = [(b, m - n - b) for b, n, m in zip(before, spatial, padded_shape)] + [(0, 0)]
    padded = np.pad(volume, widths, constant_values=pad_value) if any(map(sum, widths)) \
        else volume
    weights = gaussian_weights(patch_size, sigma_scale) if gaussian \
        else np.ones(patch_size, np.float32)
    starts = list(itertools.product(*(window_starts(n, p, overlap)
                                      for n, p in zip(padded_shape, patch_size))))
    total = norm = None
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in chunk]
        probs = np.asarray(predict_fn(np.stack([padded[box] for box in boxes])), np.float32)
        if probs.shape[:4] != (len(boxes), *patch_size):
            raise ValueError(f"predict_fn returned shape {probs.shape} for patches "
                             f"{(len(boxes), *patch_size)}: expected [N, h, w, d, K]")
        if total is None:
            total = np.zeros((*padded_shape, probs.shape[-1]), np.float32)
            norm = np.zeros(padded_shape, np.float32)
        for box, p in zip(boxes, probs):
            total[box] += p * weights[..., None]
            norm[box] += weights
    total /= norm[..., None]
    return total[tuple(slice(b, b + n) for b, n in zip(before, spatial))]


def volume_predict_fn(predict_fn, patch_size, *, overlap: float = 0.5, batch_size: int = 2):
    """A predict_fn for whole prepared volumes, as `uda_tf.evaluation.evaluate.evaluate_model` passes 3D
    records: images [B, H, W, D, C] -> {"labels" [B, H, W, D] int32, "entropy" [B, H, W, D]},
    each volume by `sliding_window` over patches of `patch_size` with `predict_fn`."""
    def predict(images):
        images = np.asarray(images, np.float32)
        if images.ndim != 5:
            raise ValueError(f"expected volumes [B, H, W, D, C], got shape {images.shape}")
        probs = np.stack([sliding_window(predict_fn, v, patch_size, overlap=overlap,
                                         batch_size=batch_size) for v in images])
        return {"labels": probs.argmax(-1).astype(np.int32), "entropy": normalized_entropy(probs)}

    return predict


def normalized_entropy(probabilities, eps: float = 1e-12) -> np.ndarray:
    """Entropy of the class distribution over the last axis divided by log K, in [0, 1] (the
    numpy twin of `uda_tf.losses.entropy_map`)."""
    p = np.asarray(probabilities, np.float64)
    k = p.shape[-1]
    return (-(p * np.log(p + eps)).sum(-1) / math.log(k)).astype(np.float32) if k > 1 else \
        np.zeros(p.shape[:-1], np.float32)
