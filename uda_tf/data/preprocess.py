"""Volume preprocessing: RAS volume -> fixed-size, fixed-spacing, normalised volume.

Steps, in order (each records what it did, so `restore_to_original` can undo the geometry):
  1. intensity: clip to percentiles of the RAS image, then min-max to [0, 1] or z-score;
  2. resample to the target spacing (image linear, label nearest), keeping the volume centre;
  3. centre pad/crop in-plane (H, W = RAS x, y) to the target size; the slice axis is kept.

The resampled grid has exactly the target spacing (its shape is rounded, its extent follows),
so every prepared slice has the same physical pixel size.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from uda_tf.data import io
from uda_tf.data.layouts import CaseRecord

NORMALIZATIONS = ("minmax", "zscore")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int] = (96, 112)
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    normalization: str = "minmax"

    def __post_init__(self):
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {self.spacing}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be 2 positive integers (H,W), got {self.size}")
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(
                f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                f"got {self.normalization!r}"
            )

    def to_manifest(self) -> dict:
        return {
            "orientation": "RAS",
            "spacing": [float(s) for s in self.spacing],
            "interpolation": {"image": "linear", "label": "nearest"},
            "clip_percentiles": [float(p) for p in self.clip_percentiles],
            "normalization": self.normalization,
            "size": [int(s) for s in self.size],
        }

    @classmethod
    def from_manifest(cls, preprocessing: dict) -> "PreprocessConfig":
        return cls(
            spacing=tuple(preprocessing["spacing"]),
            size=tuple(preprocessing["size"]),
            clip_percentiles=tuple(preprocessing["clip_percentiles"]),
            normalization=preprocessing["normalization"],
        )


@dataclasses.dataclass
class PreparedCase:
    """One preprocessed volume: image [H, W, D] float32, label [H, W, D] uint8 or None."""

    case_id: str
    domain: str
    image: np.ndarray
    label: np.ndarray | None
    record: dict  # the manifest's per-case entry, less `domain`/`split`


def normalize_intensity(
    image: np.ndarray, clip_percentiles: tuple[float, float], normalization: str
) -> tuple[np.ndarray, dict]:
    """Clips to percentiles of this volume, then scales; returns the statistics used."""
    p_low, p_high = (float(v) for v in np.percentile(image, clip_percentiles))
    clipped = np.clip(image, p_low, p_high)
    mean, std = float(clipped.mean(dtype=np.float64)), float(clipped.std(dtype=np.float64))
    if normalization == "minmax":
        offset, scale = p_low, (p_high - p_low)
    elif normalization == "zscore":
        offset, scale = mean, std
    else:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}")
    # A constant volume has no range; keep it finite (all zeros) instead of dividing by 0.
    scale = scale if scale > 0 else 1.0
    out = ((clipped - offset) / scale).astype(np.float32)
    stats = {"p_low": p_low, "p_high": p_high, "mean": mean, "std": std}
    return out, stats


def intensity_transform(intensity: dict, normalization: str) -> tuple[float, float]:
    """(offset, scale) with normalised = (clip(raw) - offset) / scale, as used above."""
    if normalization == "minmax":
        offset, scale = intensity["p_low"], intensity["p_high"] - intensity["p_low"]
    else:
        offset, scale = intensity["mean"], intensity["std"]
    return offset, (scale if scale > 0 else 1.0)


def _grid_map(n_in: int, spacing_in: float, n_out: int, spacing_out: float):
    """(zoom, offset) such that input index = zoom * output index + offset, centres aligned."""
    zoom = spacing_out / spacing_in
    return zoom, (n_in - 1) / 2.0 - zoom * (n_out - 1) / 2.0


def resampled_shape(shape, spacing_in, spacing_out) -> tuple[int, int, int]:
    return tuple(
        max(1, int(np.round(n * s_in / s_out)))
        for n, s_in, s_out in zip(shape, spacing_in, spacing_out)
    )


def resample(array: np.ndarray, spacing_in, spacing_out, order: int, shape_out=None) -> np.ndarray:
    """Resamples a 3D array to `spacing_out` (order 1 linear, 0 nearest), centres aligned."""
    shape_out = tuple(shape_out or resampled_shape(array.shape, spacing_in, spacing_out))
    maps = [
        _grid_map(n_in, s_in, n_out, s_out)
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
        prefilter=False,
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


def crop_pad_plan(shape_hw, size) -> dict:
    """Centre crop/pad amounts per in-plane axis: {"pad": [[before, after]]*2, "crop": ...}."""
    pad, crop = [], []
    for n, target in zip(shape_hw, size):
        extra = target - n
        if extra >= 0:
            pad.append([extra // 2, extra - extra // 2])
            crop.append([0, 0])
        else:
            pad.append([0, 0])
            crop.append([-extra // 2, -extra - (-extra // 2)])
    return {"pad": pad, "crop": crop}


def apply_crop_pad(array: np.ndarray, plan: dict, pad_value: float) -> np.ndarray:
    (ch0, ch1), (cw0, cw1) = plan["crop"]
    cropped = array[ch0 : array.shape[0] - ch1, cw0 : array.shape[1] - cw1]
    widths = [tuple(plan["pad"][0]), tuple(plan["pad"][1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(cropped, widths, mode="constant", constant_values=pad_value)


def undo_crop_pad(array: np.ndarray, plan: dict, fill: float = 0) -> np.ndarray:
    """Back to the resampled in-plane shape; what the crop removed is set to `fill`."""
    (ph0, ph1), (pw0, pw1) = plan["pad"]
    (ch0, ch1), (cw0, cw1) = plan["crop"]
    inner = array[ph0 : array.shape[0] - ph1, pw0 : array.shape[1] - pw1]
    widths = [(ch0, ch1), (cw0, cw1)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(inner, widths, mode="constant", constant_values=fill)


def prepared_affine(ras_affine, ras_shape, ras_spacing, config: PreprocessConfig, plan) -> list:
    """voxel -> world mm of the prepared volume, so predictions can be saved in that grid."""
    out_shape = resampled_shape(ras_shape, ras_spacing, config.spacing)
    maps = [
        _grid_map(n_in, s_in, n_out, s_out)
        for n_in, s_in, n_out, s_out in zip(ras_shape, ras_spacing, out_shape, config.spacing)
    ]
    to_input = np.eye(4)
    to_input[:3, :3] = np.diag([z for z, _ in maps])
    to_input[:3, 3] = [o for _, o in maps]
    shift = np.eye(4)  # prepared index -> resampled index
    shift[0, 3] = plan["crop"][0][0] - plan["pad"][0][0]
    shift[1, 3] = plan["crop"][1][0] - plan["pad"][1][0]
    return (np.asarray(ras_affine) @ to_input @ shift).tolist()


def preprocess_volumes(
    image: io.Volume, label: io.Volume | None, config: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Image (and label) volumes -> prepared arrays and the per-case manifest record."""
    normalized, intensity = normalize_intensity(
        image.array, config.clip_percentiles, config.normalization
    )
    resampled = resample(normalized, image.spacing, config.spacing, order=1)
    plan = crop_pad_plan(resampled.shape[:2], config.size)
    # Pad with the normalised value of the clip floor: background, whatever the scaling.
    offset, scale = intensity_transform(intensity, config.normalization)
    pad_value = float(np.float32((intensity["p_low"] - offset) / scale))
    prepared = apply_crop_pad(resampled, plan, pad_value).astype(np.float32)
    prepared_label = None
    if label is not None:
        prepared_label = apply_crop_pad(
            resample_labels(label.array, label.spacing, config.spacing), plan, 0
        ).astype(np.uint8)
    record = {
        "has_label": label is not None,
        "original_shape": [int(n) for n in image.original_shape],
        "original_spacing": [float(s) for s in image.original_spacing],
        "original_affine": np.asarray(image.original_affine).tolist(),
        "resampled_shape": [int(n) for n in resampled.shape],
        "crop_pad": {**plan, "pad_value": pad_value},
        "num_slices": int(prepared.shape[2]),
        "prepared_affine": prepared_affine(
            image.affine, image.array.shape, image.spacing, config, plan
        ),
        "intensity": intensity,
    }
    return prepared, prepared_label, record


def _check_label_grid(image: io.Volume, label: io.Volume, label_path: str) -> None:
    if label.array.shape != image.array.shape or not np.allclose(
        label.affine, image.affine, atol=1e-3
    ):
        raise io.NiftiError(
            f"label {label_path} is not on its image's grid: shape {label.original_shape} vs "
            f"{image.original_shape}, or a different affine"
        )


def prepare_case(case: CaseRecord, config: PreprocessConfig, label_values: int) -> PreparedCase:
    """Reads and preprocesses one case; picklable, so it runs in worker processes."""
    image = io.read_volume(case.image_path)
    label = None
    if case.label_path is not None:
        label = io.read_volume(case.label_path, is_label=True)
        _check_label_grid(image, label, case.label_path)
        if label.array.size and int(label.array.max()) >= label_values:
            raise io.NiftiError(
                f"label {case.label_path} has value {int(label.array.max())} but dataset.json "
                f"declares only {label_values} labels (0..{label_values - 1})"
            )
    prepared, prepared_label, record = preprocess_volumes(image, label, config)
    return PreparedCase(case.case_id, case.domain, prepared, prepared_label, record)


def restore_to_original(
    prepared: np.ndarray, case: dict, preprocessing: dict, order: int = 0, fill: float = 0
) -> np.ndarray:
    """Maps a prepared volume [H, W, D] (e.g. a predicted label map) back onto the on-disk grid
    of the original file, so it can be saved with `case["original_affine"]`.

    `case` and `preprocessing` are the manifest's entries. Use order=0 for labels. Voxels the
    in-plane crop removed get `fill`.
    """
    config = PreprocessConfig.from_manifest(preprocessing)
    if tuple(prepared.shape[:2]) != tuple(config.size):
        raise ValueError(f"expected a prepared volume of size {config.size}, got {prepared.shape}")
    uncropped = undo_crop_pad(prepared, case["crop_pad"], fill)
    ras_shape, ras_spacing = io.canonical_geometry(
        tuple(case["original_shape"]), np.asarray(case["original_affine"])
    )
    # Map each original voxel into the resampled grid (the inverse of `resample`'s mapping).
    if order == 0:
        restored = resample_labels(uncropped, config.spacing, ras_spacing, shape_out=ras_shape)
    else:
        restored = resample(uncropped, config.spacing, ras_spacing, order=order,
                            shape_out=ras_shape)
    return io.ras_to_original(restored, np.asarray(case["original_affine"]))
