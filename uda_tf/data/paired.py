"""Paired phantom slices for measuring translation: a source-domain subject prepared as a
dataset's manifest prepares it, next to the same subject rendered with the target domain's
contrast (phantom.make_subject(contrast_of=...)), normalised as the target's own scans are
and moved through exactly the source's geometry, so the two line up voxel for voxel.

Unpaired image translation (CycleGAN, AttENT) is usually judged by eye or by the segmentor it
helps; with the phantom, the translation of a source image can be compared with the image the
target scanner would have recorded of the same anatomy (uda_tf.metrics.translation_fidelity).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from uda_tf.data import io, phantom, preprocess


@dataclasses.dataclass(frozen=True)
class PairedSlices:
    source: np.ndarray     # [S, H, W, 1] prepared source-domain slices
    reference: np.ndarray  # [S, H, W, 1] the same slices rendered as the target domain
    labels: np.ndarray     # [S, H, W] uint8 tissue labels of both
    cases: tuple           # source case ids, one per subject


def check_phantom_domains(source: str, target: str, flag: str) -> None:
    """ValueError naming `flag` unless both are built-in phantom domains."""
    unknown = [d for d in (source, target) if d not in phantom.DOMAINS]
    if unknown:
        raise ValueError(f"{flag}: paired renderings exist only for built-in phantom domains "
                         f"({', '.join(phantom.DOMAINS)}); {unknown} is not one (set it to 0 "
                         "for other data)")


def _volume(array, affine, directory, name) -> io.Volume:
    path = os.path.join(directory, f"{name}.nii.gz")
    io.write_volume(path, array, affine)
    return io.read_volume(path)


def paired_slices(source: str, target: str, indices, preprocessing: dict, *, seed: int = 0,
                  spacing_scale: float = 1.0, max_slices: int | None = None) -> PairedSlices:
    """Source subjects `indices` of phantom domain `source` with their `target`-contrast
    renderings, prepared by `preprocessing` (a manifest's). Only 2D slice datasets (the
    prepared volume's slices along its last axis); `max_slices` keeps the middle ones."""
    check_phantom_domains(source, target, "paired slices")
    config = preprocess.PreprocessConfig.from_manifest(preprocessing)
    xs, refs, labels, cases = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="uda_paired_") as tmp:
        for index in indices:
            subject = phantom.make_subject(source, index, seed, spacing_scale)
            paired = phantom.make_subject(source, index, seed, spacing_scale,
                                          contrast_of=target)
            image = _volume(subject.image, subject.affine, tmp, "image")
            label = _volume(subject.label, subject.affine, tmp, "label")
            other = _volume(paired.image, paired.affine, tmp, "paired")
            x, y, record = preprocess.preprocess_volumes(image, label, config)
            # The target's own normalisation (its clip percentiles and statistics), then the
            # source's geometry: what a target scan of this anatomy looks like once prepared.
            # (statistics over the source's foreground box, which prepare normalises within)
            box = record["foreground_bbox"]
            region = other.array[tuple(slice(a, b) for a, b in box)] if box else other.array
            mask = (preprocess.foreground_mask(region, config)
                    if config.normalize_in_foreground else None)
            _, intensity = preprocess.normalize_intensity(
                region, config.clip_percentiles, config.normalization, mask)
            offset, scale = preprocess.intensity_transform(intensity, config.normalization)
            normalized = (np.clip(other.array, intensity["p_low"], intensity["p_high"])
                          - offset) / scale
            fill = float((intensity["p_low"] - offset) / scale)
            ref = preprocess.apply_geometry(normalized, other.spacing, record, preprocessing,
                                            fill=fill).astype(np.float32)
            keep = _middle(x.shape[-1], max_slices)
            xs.append(np.moveaxis(x[..., keep], -1, 0)[..., None])
            refs.append(np.moveaxis(ref[..., keep], -1, 0)[..., None])
            labels.append(np.moveaxis(y[..., keep], -1, 0))
            cases.append(subject.case_id)
    return PairedSlices(np.concatenate(xs).astype(np.float32),
                        np.concatenate(refs).astype(np.float32),
                        np.concatenate(labels).astype(np.uint8), tuple(cases))


def _middle(n: int, keep: int | None) -> slice:
    if keep is None or keep >= n:
        return slice(0, n)
    start = (n - keep) // 2
    return slice(start, start + keep)
