"""Volume preprocessing: RAS volume -> fixed-spacing, normalised, fixed-size volume.

Steps, in order; each records what it did in the case's manifest entry, so inference can apply
the same steps to a new scan (`preprocess_volumes`, `apply_geometry`) and put predictions back
on the file's grid (`restore_to_original`):
  1. (optional) crop to the bounding box of the foreground, as nnU-Net crops to the nonzero
     region (Isensee et al. 2021);
  2. intensity: clip to percentiles, then min-max to [0, 1] or z-score; the statistics may be
     taken inside a foreground mask, the transform applies to every voxel;
  3. resample to the target spacing, image linear or cubic (B-spline), labels by linearly
     interpolating each label's one-hot mask then argmax (nnU-Net's label resampling);
  4. move the slice axis last (axial: RAS z; coronal: y; sagittal: x);
  5. centre pad/crop the in-plane axes (and the slice axis too if `size` has 3 values).

The resampled grid has exactly the target spacing (its shape is rounded, its extent follows),
so every prepared slice has the same physical pixel size.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from uda_tf.data import io
from uda_tf.data.geometry import (  # noqa: F401  (re-exported: callers use preprocess.*)
    SLICE_AXES, apply_crop_pad, crop_pad_plan, from_slice_axis, grid_map, prepared_affine,
    resample, resample_labels, resampled_shape, slice_axes, to_slice_axis, undo_crop_pad)
from uda_tf.data.layouts import CaseRecord

NORMALIZATIONS = ("minmax", "zscore")
INTERPOLATIONS = {"linear": 1, "cubic": 3}
FOREGROUNDS = ("nonzero", "percentile", "roi")
_grid_map = grid_map  # the old private name


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Every preprocessing parameter; `to_manifest()` is what the manifest records.

    foreground: what counts as foreground for `crop_foreground` and `normalize_in_foreground`:
    "nonzero" voxels, voxels above the `foreground_percentile`-th percentile, or the case's
    region of interest ("roi", e.g. DRIVE's field-of-view mask; nonzero where a case has none).
    color: how RGB pictures become channels (io.COLOR_MODES); NIfTI scans ignore it.
    """

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, ...] = (96, 112)
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    normalization: str = "minmax"
    image_interpolation: str = "linear"
    slice_axis: str = "axial"
    foreground: str = "nonzero"
    foreground_percentile: float = 5.0
    normalize_in_foreground: bool = False
    crop_foreground: bool = False
    color: str = "green"

    def __post_init__(self):
        def bad(name, allowed, value):
            return ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {self.spacing}")
        if len(self.size) not in (2, 3) or min(self.size) < 1:
            raise ValueError(
                f"size must be 2 (H,W) or 3 (H,W,D) positive integers, got {self.size}")
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(
                f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise bad("normalization", NORMALIZATIONS, self.normalization)
        if self.image_interpolation not in INTERPOLATIONS:
            raise bad("image_interpolation", INTERPOLATIONS, self.image_interpolation)
        if self.slice_axis not in SLICE_AXES:
            raise bad("slice_axis", SLICE_AXES, self.slice_axis)
        if self.foreground not in FOREGROUNDS:
            raise bad("foreground", FOREGROUNDS, self.foreground)
        if not 0 <= self.foreground_percentile < 100:
            raise ValueError(
                f"foreground_percentile must be in [0, 100), got {self.foreground_percentile}")
        if self.color not in io.COLOR_MODES:
            raise bad("color", io.COLOR_MODES, self.color)

    def to_manifest(self) -> dict:
        return {
            "orientation": "RAS",
            "spacing": [float(s) for s in self.spacing],
            "interpolation": {"image": self.image_interpolation, "label": "linear_onehot"},
            "clip_percentiles": [float(p) for p in self.clip_percentiles],
            "normalization": self.normalization,
            "size": [int(s) for s in self.size],
            "slice_axis": self.slice_axis,
            "foreground": self.foreground,
            "foreground_percentile": float(self.foreground_percentile),
            "normalize_in_foreground": bool(self.normalize_in_foreground),
            "crop_foreground": bool(self.crop_foreground),
            "color": self.color,
        }

    @classmethod
    def from_manifest(cls, preprocessing: dict) -> "PreprocessConfig":
        """Also reads manifests written before the optional steps existed (their defaults)."""
        interpolation = preprocessing.get("interpolation", {})
        optional = {k: preprocessing[k] for k in (
            "slice_axis", "foreground", "foreground_percentile", "normalize_in_foreground",
            "crop_foreground", "color") if k in preprocessing}
        return cls(
            spacing=tuple(preprocessing["spacing"]),
            size=tuple(preprocessing["size"]),
            clip_percentiles=tuple(preprocessing["clip_percentiles"]),
            normalization=preprocessing["normalization"],
            image_interpolation=(interpolation.get("image", "linear")
                                 if isinstance(interpolation, dict) else "linear"),
            **optional,
        )


@dataclasses.dataclass
class PreparedCase:
    """One preprocessed volume: image [H, W, D] float32 ([H, W, D, C] when C > 1), label
    [H, W, D] uint8 or None, roi [H, W, D] uint8 or None (the region of interest)."""

    case_id: str
    domain: str
    image: np.ndarray
    label: np.ndarray | None
    record: dict  # the manifest's per-case entry, less `domain`/`split`
    roi: np.ndarray | None = None


def foreground_mask(image: np.ndarray, config: PreprocessConfig,
                    roi: np.ndarray | None = None) -> np.ndarray:
    """Boolean [X, Y, Z] foreground of a RAS image ([X, Y, Z] or [X, Y, Z, C])."""
    if config.foreground == "roi" and roi is not None:
        return roi > 0
    values = np.abs(image).max(axis=-1) if image.ndim == 4 else image
    if config.foreground == "percentile":
        return values > np.percentile(values, config.foreground_percentile)
    return values != 0


def foreground_bbox(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop]] per axis of the smallest box holding every True voxel."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def normalize_intensity(
    image: np.ndarray, clip_percentiles: tuple[float, float], normalization: str,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Clips to percentiles of this volume, then scales; returns the statistics used.

    With `mask` ([X, Y, Z], broadcast over channels), percentiles, mean and std come from the
    masked voxels only; the transform (clip(x) - offset) / scale still applies everywhere, so
    it stays one affine map per volume that inference (and export's serving_raw) can repeat.
    """
    if mask is not None and image.ndim == 4:
        mask = np.broadcast_to(mask[..., None], image.shape)
    sample = image if mask is None else image[mask]
    p_low, p_high = (float(v) for v in np.percentile(sample, clip_percentiles))
    if not (np.isfinite(p_low) and np.isfinite(p_high)):
        # Interpolating between values near the float32 limit overflows float32; float64
        # holds any finite float32 difference.
        p_low, p_high = (float(v) for v in np.percentile(sample.astype(np.float64),
                                                         clip_percentiles))
    clipped_sample = np.clip(sample, p_low, p_high)
    mean = float(clipped_sample.mean(dtype=np.float64))
    std = float(clipped_sample.std(dtype=np.float64))
    stats = {"p_low": p_low, "p_high": p_high, "mean": mean, "std": std}
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}")
    offset, scale = intensity_transform(stats, normalization)
    clipped = np.clip(image, p_low, p_high)
    with np.errstate(over="ignore", invalid="ignore"):
        out = ((clipped - offset) / scale).astype(np.float32)
    if not np.isfinite(out).all():  # float32 overflow of `clipped - offset` near its limit
        out = ((clipped.astype(np.float64) - offset) / scale).astype(np.float32)
    return out, stats


def intensity_transform(intensity: dict, normalization: str) -> tuple[float, float]:
    """(offset, scale) with normalised = (clip(raw) - offset) / scale, as used above."""
    if normalization == "minmax":
        offset, scale = intensity["p_low"], intensity["p_high"] - intensity["p_low"]
    else:
        offset, scale = intensity["mean"], intensity["std"]
    # A constant volume has no range; keep it finite (all zeros) instead of dividing by 0.
    return offset, (scale if scale > 0 else 1.0)


def _preprocess(image: io.Volume, label: io.Volume | None, roi: io.Volume | None,
                config: PreprocessConfig):
    """(prepared image, prepared label, prepared roi, record) of one case."""
    array, label_array = image.array, None if label is None else label.array
    roi_array = None if roi is None else roi.array
    mask = None
    if config.crop_foreground or config.normalize_in_foreground:
        mask = foreground_mask(array, config, roi_array)
        if not mask.any():
            raise io.NiftiError(f"image has no foreground voxels (foreground={config.foreground})")
    bbox = None
    if config.crop_foreground:
        bbox = foreground_bbox(mask)
        box = tuple(slice(a, b) for a, b in bbox)
        array, mask = array[box], mask[box]
        label_array = None if label_array is None else label_array[box]
        roi_array = None if roi_array is None else roi_array[box]
    normalized, intensity = normalize_intensity(
        array, config.clip_percentiles, config.normalization,
        mask if config.normalize_in_foreground else None)
    order = INTERPOLATIONS[config.image_interpolation]
    resampled = resample(normalized, image.spacing, config.spacing, order=order)
    axes = slice_axes(config.slice_axis)
    moved = to_slice_axis(resampled, axes)
    plan = crop_pad_plan(moved.shape[: len(config.size)], config.size)
    # Pad with the normalised value of the clip floor: background, whatever the scaling.
    offset, scale = intensity_transform(intensity, config.normalization)
    pad_value = float(np.float32((intensity["p_low"] - offset) / scale))
    prepared = apply_crop_pad(moved, plan, pad_value).astype(np.float32)

    def prepare_mask(values):
        resampled_mask = resample_labels(values, image.spacing, config.spacing)
        return apply_crop_pad(to_slice_axis(resampled_mask, axes), plan, 0).astype(np.uint8)

    prepared_label = None if label_array is None else prepare_mask(label_array)
    prepared_roi = None if roi_array is None else prepare_mask(roi_array)
    spacing = [float(config.spacing[a]) for a in axes]
    record = {
        "has_label": label is not None,
        "original_shape": [int(n) for n in image.original_shape],
        "original_spacing": [float(s) for s in image.original_spacing],
        "original_affine": np.asarray(image.original_affine).tolist(),
        "foreground_bbox": bbox,
        "resampled_shape": [int(n) for n in resampled.shape[:3]],
        "axes": list(axes),
        "crop_pad": {**plan, "pad_value": pad_value},
        "prepared_shape": [int(n) for n in prepared.shape],
        "prepared_spacing": spacing,
        "num_slices": int(prepared.shape[2]),
        "prepared_affine": prepared_affine(
            image.affine, array.shape[:3], image.spacing, config.spacing, plan, axes,
            None if bbox is None else [a for a, _ in bbox]),
        "intensity": intensity,
    }
    return prepared, prepared_label, prepared_roi, record


def preprocess_volumes(
    image: io.Volume, label: io.Volume | None, config: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Image (and label) volumes -> prepared arrays and the per-case manifest record."""
    prepared, prepared_label, _, record = _preprocess(image, label, None, config)
    return prepared, prepared_label, record


def apply_geometry(array: np.ndarray, spacing, case: dict, preprocessing: dict, *,
                   order: int = 1, fill: float = 0.0) -> np.ndarray:
    """The recorded geometric steps (foreground crop, resampling, slice axis, crop/pad) applied
    to another array on the same RAS grid, e.g. raw intensities for export's serving_raw.
    `spacing` is the RAS voxel spacing of `array`; order 0 resamples labels."""
    config = PreprocessConfig.from_manifest(preprocessing)
    bbox = case.get("foreground_bbox")
    if bbox:
        array = array[tuple(slice(a, b) for a, b in bbox)]
    if order == 0:
        resampled = resample_labels(array, spacing, config.spacing)
    else:
        resampled = resample(array, spacing, config.spacing, order=order)
    moved = to_slice_axis(resampled, case.get("axes", (0, 1, 2)))
    return apply_crop_pad(moved, case["crop_pad"], fill)


def slices_with_context(prepared: np.ndarray, context: int = 0) -> np.ndarray:
    """[D, H, W, (2k+1)C] slices of a prepared [H, W, D(, C)] volume, each with its k
    neighbours on either side as extra channels (2.5D input; edge slices repeat), ordered
    from offset -k to +k. context=0 gives the plain slices with a channel axis."""
    volume = prepared if prepared.ndim == 4 else prepared[..., None]
    depth = volume.shape[2]
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)  # [D, 2k+1]
    stacked = volume[:, :, index]  # [H, W, D, 2k+1, C]
    stacked = stacked.reshape(*volume.shape[:2], depth, -1)
    return np.ascontiguousarray(np.moveaxis(stacked, 2, 0))


def _check_image(image: io.Volume, path: str) -> None:
    if image.array.size == 0:
        raise io.NiftiError(f"image {path} is empty (shape {tuple(image.original_shape)})")
    low, high = float(image.array.min()), float(image.array.max())
    if low == high:
        raise io.NiftiError(f"image {path} is empty: every voxel is {low:g}")


def _check_label_values(label: io.Volume, path: str, label_values: int) -> None:
    present = np.unique(label.array)
    outside = [int(v) for v in present if v >= label_values]
    if outside:
        raise io.NiftiError(
            f"label {path} has values {outside} outside the declared labels "
            f"0..{label_values - 1}: dataset.json/the layout declares only {label_values} labels"
        )


def _check_prepared(prepared: np.ndarray, record: dict, case: CaseRecord) -> None:
    """The guarantee behind the arithmetic: no NaN or infinity reaches a shard."""
    bad = int(np.count_nonzero(~np.isfinite(prepared)))
    stats = record["intensity"].values()
    if bad or not all(np.isfinite(v) for v in stats) or not np.isfinite(
            record["crop_pad"]["pad_value"]):
        raise io.NiftiError(
            f"case {case.case_id!r} ({case.image_path}): preprocessing produced {bad} NaN or "
            f"infinite voxels (intensity statistics {record['intensity']}); the image's "
            "values are probably beyond what float32 arithmetic can scale (near +-3.4e38)")


def prepare_case(case: CaseRecord, config: PreprocessConfig, label_values: int, *,
                 max_voxels: int | None = None) -> PreparedCase:
    """Reads, checks and preprocesses one case; picklable, so it runs in worker processes.
    Every problem is an io.NiftiError (or FileNotFoundError) naming the file. `max_voxels`
    bounds every file's declared size (io.read_volume)."""
    image = io.read_channels(case.image_paths, color=config.color, max_voxels=max_voxels)
    _check_image(image, case.image_path)
    label = roi = None
    if case.label_path is not None:
        label = io.read_volume(case.label_path, is_label=True, binarize=case.binarize_label,
                               max_voxels=max_voxels)
        io.check_same_grid(image, label, case.image_path, case.label_path, "label")
        _check_label_values(label, case.label_path, label_values)
    if case.mask_path is not None:
        roi = io.read_volume(case.mask_path, is_label=True, binarize=True,
                             max_voxels=max_voxels)
        io.check_same_grid(image, roi, case.image_path, case.mask_path,
                           "region-of-interest mask")
    try:
        prepared, prepared_label, prepared_roi, record = _preprocess(image, label, roi, config)
    except io.NiftiError as e:
        raise io.NiftiError(f"{case.image_path}: {e}") from e
    _check_prepared(prepared, record, case)
    record["has_roi"] = roi is not None
    return PreparedCase(case.case_id, case.domain, prepared, prepared_label, record,
                        prepared_roi)


def restore_to_original(
    prepared: np.ndarray, case: dict, preprocessing: dict, order: int = 0, fill: float = 0
) -> np.ndarray:
    """Maps a prepared volume [H, W, D] (e.g. a predicted label map; [H, W, D, K] with
    order >= 1 for probabilities) back onto the on-disk grid of the original file, so it can
    be saved with `case["original_affine"]`.

    `case` and `preprocessing` are the manifest's entries. Use order=0 for labels. Voxels the
    crops removed (in-plane crop, foreground crop) get `fill`.
    """
    config = PreprocessConfig.from_manifest(preprocessing)
    n = len(case["crop_pad"]["pad"])
    if tuple(prepared.shape[:n]) != tuple(config.size[:n]):
        raise ValueError(f"expected a prepared volume of size {config.size}, got {prepared.shape}")
    axes = case.get("axes", (0, 1, 2))
    uncropped = from_slice_axis(undo_crop_pad(prepared, case["crop_pad"], fill), axes)
    ras_shape, ras_spacing = io.canonical_geometry(
        tuple(case["original_shape"]), np.asarray(case["original_affine"])
    )
    bbox = case.get("foreground_bbox")
    inner_shape = tuple(b - a for a, b in bbox) if bbox else ras_shape
    # Map each original voxel into the resampled grid (the inverse of `resample`'s mapping).
    if order == 0:
        restored = resample_labels(uncropped, config.spacing, ras_spacing, shape_out=inner_shape)
    else:
        restored = resample(uncropped, config.spacing, ras_spacing, order=order,
                            shape_out=inner_shape)
    if bbox:
        widths = [(a, n - b) for (a, b), n in zip(bbox, ras_shape)]
        widths += [(0, 0)] * (restored.ndim - 3)
        restored = np.pad(restored, widths, mode="constant", constant_values=fill)
    return io.ras_to_original(restored, np.asarray(case["original_affine"]))
