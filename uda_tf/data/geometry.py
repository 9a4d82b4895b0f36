"""Grid operations of preprocessing and their inverses: resampling, slice-axis permutation,
centre crop/pad, and the affine of the result. (Re-exported by uda_tf.data.preprocess.)"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# RAS axes of the prepared (H, W, slice) axes for each slice orientation.
SLICE_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


def slice_axes(name: str) -> tuple[int, int, int]:
    if name not in SLICE_AXES:
        raise ValueError(f"slice_axis must be one of {', '.join(SLICE_AXES)}, got {name!r}")
    return SLICE_AXES[name]


def to_slice_axis(array: np.ndarray, axes) -> np.ndarray:
    """RAS [X, Y, Z, ...] -> prepared order [H, W, D, ...] (trailing axes kept)."""
    axes = tuple(int(a) for a in axes)
    return np.transpose(array, axes + tuple(range(3, array.ndim)))


def from_slice_axis(array: np.ndarray, axes) -> np.ndarray:
    """Inverse of `to_slice_axis`."""
    inverse = tuple(int(a) for a in np.argsort(axes))
    return np.transpose(array, inverse + tuple(range(3, array.ndim)))


def grid_map(n_in: int, spacing_in: float, n_out: int, spacing_out: float):
    """(zoom, offset) such that input index = zoom * output index + offset, centres aligned."""
    zoom = spacing_out / spacing_in
    return zoom, (n_in - 1) / 2.0 - zoom * (n_out - 1) / 2.0


def resampled_shape(shape, spacing_in, spacing_out) -> tuple[int, int, int]:
    return tuple(
        max(1, int(np.round(n * s_in / s_out)))
        for n, s_in, s_out in zip(shape, spacing_in, spacing_out)
    )


def resample(array: np.ndarray, spacing_in, spacing_out, order: int, shape_out=None) -> np.ndarray:
    """Resamples the first 3 axes to `spacing_out`, centres aligned; trailing axes (channels,
    class probabilities) are resampled one by one. order 0 nearest, 1 linear, 3 cubic
    B-spline (with its prefilter, so it interpolates rather than smooths)."""
    if array.ndim > 3:
        channels = [resample(array[..., c], spacing_in, spacing_out, order, shape_out)
                    for c in range(array.shape[-1])]
        return np.stack(channels, axis=-1)
    shape_out = tuple(shape_out or resampled_shape(array.shape, spacing_in, spacing_out))
    maps = [
        grid_map(n_in, s_in, n_out, s_out)
        for n_in, s_in, n_out, s_out in zip(array.shape, spacing_in, shape_out, spacing_out)
    ]
    if all(abs(z - 1) < 1e-9 and abs(o) < 1e-9 for z, o in maps) and shape_out == array.shape:
        return array.copy()
    # A diagonal (1-D) matrix takes scipy's separable fast path.
    return ndimage.affine_transform(
        array,
        matrix=np.array([z for z, _ in maps]),
        offset=np.array([o for _, o in maps]),
        output_shape=shape_out,
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )


def resample_labels(labels: np.ndarray, spacing_in, spacing_out, shape_out=None) -> np.ndarray:
    """Resamples a label map by linear interpolation of each label's mask, then argmax.

    Nearest neighbour would pick one side at every exact midpoint (an even downsampling
    factor), shifting labels by half an input voxel against the linearly resampled image;
    interpolating one-hot masks, as nnU-Net does, keeps both on the same geometry."""
    values = np.unique(labels)
    if len(values) == 1:
        shape_out = tuple(shape_out or resampled_shape(labels.shape, spacing_in, spacing_out))
        return np.full(shape_out, values[0], labels.dtype)
    best = score = None
    for value in values:
        mask = resample((labels == value).astype(np.float32), spacing_in, spacing_out, order=1,
                        shape_out=shape_out)
        if best is None:
            best, score = np.full(mask.shape, value, labels.dtype), mask
        else:
            better = mask > score
            best[better] = value
            score = np.maximum(score, mask)
    return best


def crop_pad_plan(shape, size) -> dict:
    """Centre crop/pad amounts for the leading len(size) axes:
    {"pad": [[before, after]] * n, "crop": [[before, after]] * n}."""
    pad, crop = [], []
    for n, target in zip(shape, size):
        extra = target - n
        if extra >= 0:
            pad.append([extra // 2, extra - extra // 2])
            crop.append([0, 0])
        else:
            pad.append([0, 0])
            crop.append([-extra // 2, -extra - (-extra // 2)])
    return {"pad": pad, "crop": crop}


def apply_crop_pad(array: np.ndarray, plan: dict, pad_value: float) -> np.ndarray:
    n = len(plan["crop"])
    box = tuple(slice(a, array.shape[i] - b) for i, (a, b) in enumerate(plan["crop"]))
    widths = [tuple(p) for p in plan["pad"]] + [(0, 0)] * (array.ndim - n)
    return np.pad(array[box], widths, mode="constant", constant_values=pad_value)


def undo_crop_pad(array: np.ndarray, plan: dict, fill: float = 0) -> np.ndarray:
    """Back to the shape before `apply_crop_pad`; what the crop removed is set to `fill`."""
    n = len(plan["pad"])
    inner = array[tuple(slice(a, array.shape[i] - b) for i, (a, b) in enumerate(plan["pad"]))]
    widths = [tuple(c) for c in plan["crop"]] + [(0, 0)] * (array.ndim - n)
    return np.pad(inner, widths, mode="constant", constant_values=fill)


def prepared_affine(ras_affine, ras_shape, ras_spacing, spacing_out, plan, axes=(0, 1, 2),
                    offset=None) -> list:
    """voxel -> world mm of the prepared volume, so predictions can be saved in that grid.

    `ras_shape`/`ras_spacing` describe the RAS grid that was resampled (after any foreground
    crop, whose start index is `offset`); `spacing_out` may also be a PreprocessConfig."""
    spacing_out = tuple(getattr(spacing_out, "spacing", spacing_out))
    out_shape = resampled_shape(ras_shape, ras_spacing, spacing_out)
    maps = [
        grid_map(n_in, s_in, n_out, s_out)
        for n_in, s_in, n_out, s_out in zip(ras_shape, ras_spacing, out_shape, spacing_out)
    ]
    to_input = np.eye(4)  # resampled RAS index -> (cropped) RAS index
    to_input[:3, :3] = np.diag([z for z, _ in maps])
    to_input[:3, 3] = [o for _, o in maps]
    if offset is not None:
        to_input[:3, 3] += np.asarray(offset, float)
    permute = np.zeros((4, 4))  # prepared-order index -> RAS-order index
    permute[3, 3] = 1
    for i, axis in enumerate(axes):
        permute[axis, i] = 1
    shift = np.eye(4)  # prepared index -> index before crop/pad
    for i, ((crop, _), (pad, _)) in enumerate(zip(plan["crop"], plan["pad"])):
        shift[i, 3] = crop - pad
    return (np.asarray(ras_affine) @ to_input @ permute @ shift).tolist()
