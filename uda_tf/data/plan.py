"""Planning: look at a raw dataset before preparing it, and suggest settings that suit it.

After nnU-Net's experiment planning (Isensee et al., Nature Methods 2021): a *fingerprint* of
the data (per domain: cases, labelled cases, voxel spacing and image size in RAS order after
reorientation, intensity statistics of a few cases) and rules that turn it into `prepare`
and `train.py` settings. The rules, each stated where it is applied in `suggest`:

- spacing: the median spacing of all cases along each axis (nnU-Net's target spacing);
- slice axis (2D): across the axis with the coarsest median spacing (a thick-slice scan is
  sliced across its slices), axial when they tie;
- size: the largest resampled extent of any case per axis (prepare pads or crops to it from
  the centre, so nothing is cut off), rounded up to a multiple of 2^unet_depth, at most 512
  in-plane (3D: 256 per axis);
- intensities: CT-like data (0.5th percentile below -500, Hounsfield units) is clipped to the
  0.5th-99.5th percentiles and scaled to [0, 1]; anything else (MRI, pictures) is z-scored
  after the same clip, since its intensity scale means nothing across scanners;
- 3D patch: the prepared volume shrunk evenly to at most 2^21 voxels;
- batch: as many slices (or patches) as about 2^20 voxels per replica, between 2 and 64;
- length: an epoch is one pass over the source training slices (at least 50, at most 250
  steps); 100 epochs with a GPU, 10 on CPU only.

Only image headers are read for the geometry; voxels only for the intensity sample
(`intensity_cases` per domain). Target labels are never read.
"""
from __future__ import annotations

import dataclasses
import math

import nibabel as nib
import numpy as np

from uda_tf.data import io
from uda_tf.data.layouts import CaseRecord, Listing

MAX_SLICE_SIZE = 512
MAX_VOLUME_SIZE = 256
VOXELS_PER_REPLICA = 2**20  # slices/patches per replica batch: about this many voxels
SLICE_AXES = {0: "sagittal", 1: "coronal", 2: "axial"}  # RAS axis sliced across


@dataclasses.dataclass(frozen=True)
class CaseGeometry:
    case_id: str
    domain: str
    labelled: bool
    spacing: tuple[float, float, float]  # mm along R, A, S (after reorientation)
    shape: tuple[int, int, int]  # voxels along R, A, S


def case_geometry(case: CaseRecord) -> CaseGeometry:
    """Spacing and shape in RAS order, from the header alone (pictures: 1 mm, one slice)."""
    labelled = case.label_path is not None
    if io.is_picture(case.image_path):
        return CaseGeometry(case.case_id, case.domain, labelled, (1.0, 1.0, 1.0),
                            io.picture_shape(case.image_path))
    img = nib.load(case.image_path)  # the header; no voxel is read
    shape, spacing = io.canonical_geometry(img.shape[:3], img.affine)
    return CaseGeometry(case.case_id, case.domain, labelled,
                        tuple(float(v) for v in spacing), shape)


def intensity_sample(case: CaseRecord, rng: np.random.Generator,
                     voxels: int = 200_000) -> np.ndarray:
    """Up to `voxels` image values of the case (all of them when fewer), drawn at random."""
    values = io.read_volume(case.image_path).array.reshape(-1)
    values = values[np.isfinite(values)]
    if values.size > voxels:
        values = rng.choice(values, voxels, replace=False)
    return values


def fingerprint(listing: Listing, *, intensity_cases: int = 4, seed: int = 0) -> dict:
    """The dataset's fingerprint: per domain the case counts, the median, smallest and largest
    spacing and shape (RAS) and intensity percentiles over `intensity_cases` cases (spread
    over the domain's cases)."""
    rng = np.random.default_rng(seed)
    geometries = [case_geometry(c) for c in listing.cases]
    domains = {}
    for domain in sorted({g.domain for g in geometries}):
        mine = [g for g in geometries if g.domain == domain]
        spacing = np.array([g.spacing for g in mine])
        shape = np.array([g.shape for g in mine])
        cases = [c for c in listing.cases if c.domain == domain]
        picks = np.unique(np.linspace(0, len(cases) - 1, min(intensity_cases, len(cases)))
                          .round().astype(int))
        values = np.concatenate([intensity_sample(cases[i], rng) for i in picks])
        domains[domain] = {
            "cases": len(mine), "labelled": sum(g.labelled for g in mine),
            "spacing_median": _floats(np.median(spacing, axis=0)),
            "spacing_min": _floats(spacing.min(axis=0)),
            "spacing_max": _floats(spacing.max(axis=0)),
            "shape_median": _ints(np.median(shape, axis=0)),
            "shape_min": _ints(shape.min(axis=0)), "shape_max": _ints(shape.max(axis=0)),
            "extent_mm_max": _floats((spacing * shape).max(axis=0)),
            "intensity": {"cases": len(picks), **{
                f"p{q:g}": float(np.percentile(values, q)) for q in (0.5, 50, 99.5)},
                "mean": float(values.mean()), "std": float(values.std())},
            "picture": any(io.is_picture(c.image_path) for c in cases)}
    return {"dataset": listing.name, "label_names": dict(listing.label_names),
            "domains": domains,
            "cases": [dataclasses.asdict(g) for g in geometries]}


def _floats(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def _ints(values) -> list[int]:
    return [int(round(float(v))) for v in values]


def _round_up(value: float, multiple: int, cap: int) -> int:
    return int(min(cap, max(multiple, math.ceil(value / multiple) * multiple)))


def suggest(fp: dict, *, source: str, target: str | None, dims: int = 2,
            unet_depth: int = 3, gpus: int = 0, train_fraction: float = 0.6) -> dict:
    """prepare and train.py settings for the fingerprint `fp` (the rules of the module
    docstring), with the reason for each: {"prepare": {flag: value}, "train": {flag:
    value}, "reasons": {flag: text}, "warnings": [text]}."""
    if source not in fp["domains"]:
        raise ValueError(f"source domain {source!r} is not in the data; domains: "
                         f"{', '.join(fp['domains'])}")
    if target is not None and target not in fp["domains"]:
        raise ValueError(f"target domain {target!r} is not in the data; domains: "
                         f"{', '.join(fp['domains'])}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    used = [source] + ([target] if target else [])
    cases = [c for c in fp["cases"] if c["domain"] in used]
    spacings = np.array([c["spacing"] for c in cases])
    extents = np.array([np.multiply(c["spacing"], c["shape"]) for c in cases])
    spacing = np.median(spacings, axis=0)
    reasons, warnings = {}, []
    reasons["spacing"] = ("median voxel spacing of the source and target cases per RAS axis "
                          "(mm)")
    picture = any(fp["domains"][d]["picture"] for d in used)
    if picture:
        spacing = np.ones(3)
        reasons["spacing"] = "pictures: one pixel is one unit"
    step = 2 ** unet_depth
    voxels = extents.max(axis=0) / spacing  # the largest case, resampled
    prepare = {"spacing": ",".join(f"{v:g}" for v in np.round(spacing, 3))}
    if dims == 2:
        axis = 2 if picture else int(np.argmax(spacing))
        if not picture and np.isclose(spacing[axis], spacing[2]):
            axis = 2  # ties: axial
        plane = [a for a in range(3) if a != axis]
        size = [_round_up(voxels[a], step, MAX_SLICE_SIZE) for a in plane]
        prepare["slice_axis"] = SLICE_AXES[axis]
        reasons["slice_axis"] = (f"slices across the coarsest axis ({SLICE_AXES[axis]}, "
                                 f"{spacing[axis]:.3g} mm)")
        train_items = sum(c["shape"][axis] * c["spacing"][axis] / spacing[axis]
                          for c in cases if c["domain"] == source and c["labelled"])
    else:
        size = [_round_up(v, step, MAX_VOLUME_SIZE) for v in voxels]
        train_items = sum(c["labelled"] for c in cases if c["domain"] == source)
    if any(math.ceil(v) > s for v, s in zip(voxels[[a for a in range(3) if dims == 3 or
                                                    a != axis]], size)):
        warnings.append("the largest cases are cropped to the size cap; consider a coarser "
                        "--spacing or --crop_foreground")
    prepare["size"] = ",".join(map(str, size))
    reasons["size"] = (f"largest resampled extent of any case, rounded up to a multiple of "
                       f"2^{unet_depth}={step} (centre pad/crop)")
    low = min(fp["domains"][d]["intensity"]["p0.5"] for d in used)
    if low < -500:
        prepare.update(normalization="minmax", clip_percentiles="0.5,99.5")
        reasons["normalization"] = (f"CT-like intensities (0.5th percentile {low:.0f}): "
                                    "clip to the 0.5-99.5th percentiles, scale to [0, 1]")
    else:
        prepare.update(normalization="zscore", clip_percentiles="0.5,99.5")
        reasons["normalization"] = ("intensities without a fixed scale (MRI, pictures): clip "
                                    "to the 0.5-99.5th percentiles, then z-score per case")
    training = suggest_training(source=source, target=target, size=size, unet_depth=unet_depth,
                                gpus=gpus, train_items=train_items * train_fraction)
    reasons.update(training["reasons"])
    for domain in used:
        info = fp["domains"][domain]
        if info["cases"] < 5:
            warnings.append(f"domain {domain} has only {info['cases']} cases; the split "
                            "leaves few for validation and test")
    if not fp["domains"][source]["labelled"]:
        raise ValueError(f"source domain {source!r} has no labelled case")
    ratio = spacing.max() / spacing.min()
    if dims == 3 and ratio > 3:
        warnings.append(f"anisotropic spacing (ratio {ratio:.1f}): a 2D plan (--dims=2) "
                        "slices across the thick axis instead")
    return {"prepare": prepare, "train": training["train"], "reasons": reasons,
            "warnings": warnings}


def suggest_training(*, source: str, target: str | None, size, unet_depth: int, gpus: int,
                     train_items: float) -> dict:
    """train.py settings for items (slices [H, W], or volumes [H, W, D]) of `size`, with
    `train_items` labelled source items to train on (module docstring: patch, batch, length).
    {"train": {flag: value}, "reasons": {flag: text}}."""
    dims = len(size)
    step = 2 ** unet_depth
    reasons = {}
    if dims == 3:
        # the training patch: the volume, shrunk evenly until it holds at most 2^21 voxels
        shrink = min(1.0, (2 * VOXELS_PER_REPLICA / np.prod(size)) ** (1 / 3))
        patch = [min(int(n), _round_up(n * shrink, step, MAX_VOLUME_SIZE)) for n in size]
        voxels_per_item = int(np.prod(patch))
    else:
        voxels_per_item = int(size[0]) * int(size[1])
    replicas = max(1, gpus)
    per_replica = int(min(64, max(2, 2 ** math.floor(math.log2(
        max(1, VOXELS_PER_REPLICA // voxels_per_item))))))
    batch = per_replica * replicas
    item = "slices" if dims == 2 else "patches"
    reasons["global_batch_size"] = (f"{per_replica} per replica ({item} of {voxels_per_item} "
                                    f"voxels, about 2^20 voxels) x {replicas} replica(s)")
    steps = int(min(250, max(50, math.ceil(train_items / batch))))
    epochs = 100 if gpus else 10
    reasons["steps_per_epoch"] = (f"one pass over about {train_items:.0f} source training "
                                  f"{'slices' if dims == 2 else 'volumes'} (50 to 250 steps)")
    reasons["epochs"] = "100 with a GPU, 10 on CPU only"
    train = {"source_domain": source, **({"target_domain": target} if target else {}),
             "model": "unet2d" if dims == 2 else "unet3d", "unet_depth": unet_depth,
             "global_batch_size": batch, "steps_per_epoch": steps, "epochs": epochs,
             "select_on": "source_dice"}
    if dims == 3:
        train["patch_size"] = ",".join(map(str, patch))
        reasons["patch_size"] = ("the prepared volume shrunk evenly to at most 2^21 voxels "
                                 "(whole volumes are evaluated by sliding window)")
    reasons["select_on"] = "source validation Dice: no target label chooses the checkpoint"
    return {"train": train, "reasons": reasons}


def prepared_fingerprint(manifest) -> dict:
    """The fingerprint of a prepared dataset, from its manifest: per domain the cases per
    split, labelled cases and training records, the record size and spacing."""
    domains = {}
    for domain in manifest.domains:
        cases = {split: len(manifest.cases(domain, split)) for split in manifest.splits(domain)}
        domains[domain] = {
            "cases": sum(cases.values()), "cases_per_split": cases,
            "labelled": sum(len(manifest.labelled_cases(domain, s))
                            for s in manifest.splits(domain)),
            "labelled_train": len(manifest.labelled_cases(domain, "train")),
            "train_records": manifest.num_records(domain, "train")}
    return {"dataset": manifest.dataset_name, "label_names": dict(manifest.label_names),
            "record_kind": manifest.record_kind, "image_shape": manifest.image_shape,
            "spacing": manifest.preprocessing.get("spacing"), "domains": domains}


def suggest_for_prepared(fp: dict, *, source: str, target: str | None, unet_depth: int = 3,
                         gpus: int = 0) -> dict:
    """train.py settings for a prepared dataset's fingerprint (`prepared_fingerprint`)."""
    for role, name in (("source", source), ("target", target)):
        if name is not None and name not in fp["domains"]:
            raise ValueError(f"{role} domain {name!r} is not in the data; domains: "
                             f"{', '.join(fp['domains'])}")
    info = fp["domains"][source]
    if not info["labelled_train"]:
        raise ValueError(f"source domain {source!r} has no labelled training case")
    size = fp["image_shape"][:3 if fp["record_kind"] == "volumes" else 2]
    warnings = []
    depth = unet_depth
    while depth > 1 and any(int(n) % 2 ** depth for n in size if n is not None):
        depth -= 1
    if depth != unet_depth:
        warnings.append(f"the prepared size {size} does not divide by 2^{unet_depth}: "
                        f"--unet_depth={depth}")
    items = info["train_records"] * info["labelled_train"] / max(
        1, info["cases_per_split"].get("train", 0))
    out = suggest_training(source=source, target=target, size=size, unet_depth=depth,
                           gpus=gpus, train_items=items)
    return {"prepare": {}, "train": out["train"], "reasons": out["reasons"],
            "warnings": warnings}
