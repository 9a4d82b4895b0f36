"""Built-in demo data: brain tissue phantoms from the MNI152 2009a template, per scanner domain.

Each subject is the template anatomy (T1 brain mask, GM and WM maps that ship inside the nilearn
wheel) under a random similarity transform plus a smooth elastic deformation, rendered as an MR
image by a named scanner model: per-tissue contrast, a smooth multiplicative bias field, a point
spread function, thick-slice partial volume, Rician noise, a stored intensity range and a stored
NIfTI orientation. Labels (0 background, 1 CSF, 2 GM, 3 WM) come from the same resampled tissue
maps that produce the image, so image and label never disagree.

    python -m uda_tf.cli.phantom --output_dir=/tmp/phantom --domains=scanner_a,scanner_b

writes the nnU-Net v2 / MSD layout of docs/CONTRACTS.md. Anatomy: MNI ICBM152 2009a nonlinear
symmetric template (Fonov et al., NeuroImage 2011; McConnell Brain Imaging Centre), as
redistributed by nilearn; acknowledge it when publishing results on this data.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import multiprocessing
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from uda_tf.files import atomic_write, is_partial

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
TISSUES = ("CSF", "GM", "WM")  # channel order of every tissue probability array, [..., 3]
# Head field of view in RAS mm: tight around the template head with its synthetic scalp.
HEAD_FOV_MM = np.array([176.0, 208.0, 176.0])
HEAD_CENTRE_MM = np.array([0.0, -17.0, 8.0])
TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclasses.dataclass(frozen=True)
class Domain:
    """How one scanner renders anatomy. Intensities are on a unit scale before storage."""
    channel: str          # name written to dataset.json channel_names
    # Mean signal of (air, CSF, GM, WM, skull, scalp); the order of these six is the contrast.
    means: tuple[float, float, float, float, float, float]
    spacing: tuple[float, float, float]   # mm along the stored axes i, j, k (slice axis last)
    orientation: str      # stored axis codes as nibabel writes them, e.g. "RAS", "LPS"
    bias_std: float       # std of the log bias field over the field of view
    noise_std: float      # Rician sigma on the unit intensity scale
    psf_fwhm_mm: float    # in-plane Gaussian point spread function
    gain: float           # stored value = offset + gain * intensity, rounded, clipped, int16
    offset: float
    max_value: int
    contrast_jitter: float = 0.03   # relative per-subject spread of the tissue means


# Tuned so that a model trained on scanner_a loses some accuracy on scanner_b (flatter GM/WM
# contrast, darker scalp, stronger bias, more noise, 3 mm slices), more on lowfield, but fails on
# t2like (inverted contrast). Check: a small 2D U-Net trained on 6 scanner_a subjects (percentile-
# normalised axial slices at 2 mm) scored mean CSF/GM/WM Dice 0.85 on scanner_a, 0.63 on
# scanner_b, 0.18 on t2like. lowfield was measured apart (benchmarks/accuracy.py, seed 0, 20
# subjects per domain, configs/demo.cfg at 24x50 steps): trained on 12 scanner_a subjects 0.91
# on scanner_a and 0.51 on lowfield test volumes; trained on 12 lowfield subjects 0.80 on them.
DOMAINS: dict[str, Domain] = {
    "scanner_a": Domain(channel="T1", means=(0.0, 0.22, 0.55, 0.80, 0.08, 0.90),
                        spacing=(1.2, 1.2, 1.2), orientation="RAS", bias_std=0.05,
                        noise_std=0.02, psf_fwhm_mm=1.0, gain=1000.0, offset=0.0,
                        max_value=1000),
    "scanner_b": Domain(channel="T1", means=(0.0, 0.30, 0.60, 0.80, 0.12, 0.75),
                        spacing=(1.0, 1.0, 3.0), orientation="LPS", bias_std=0.15,
                        noise_std=0.04, psf_fwhm_mm=1.5, gain=3000.0, offset=400.0,
                        max_value=4095),
    # Low-field-like (cf. portable 0.064 T T1 scans: ~1.5 x 1.5 x 5 mm, low SNR): compressed
    # grey/white contrast, a strong bias field, heavy Rician noise, a wide PSF, 5 mm axial slices.
    "lowfield": Domain(channel="T1", means=(0.0, 0.32, 0.58, 0.70, 0.15, 0.80),
                       spacing=(1.4, 1.4, 5.0), orientation="LAI", bias_std=0.30,
                       noise_std=0.07, psf_fwhm_mm=3.0, gain=1200.0, offset=100.0,
                       max_value=2047, contrast_jitter=0.05),
    "t2like": Domain(channel="T2", means=(0.0, 0.95, 0.55, 0.35, 0.06, 0.55),
                     spacing=(1.0, 1.0, 4.0), orientation="LIP", bias_std=0.12,
                     noise_std=0.035, psf_fwhm_mm=1.2, gain=2500.0, offset=0.0,
                     max_value=3000),
}


def template_path(kind: str) -> Path:
    """Path of the MNI152 2009a `kind` map ("t1", "gm", "wm") inside the installed nilearn."""
    name = TEMPLATE_NAME.format(kind)
    # Only locate the package: importing nilearn itself would pull in sklearn and pandas.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the phantom needs {name} from the nilearn package, which is "
                                "not installed (pip install nilearn)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "data" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found under nilearn/datasets/data in "
                            f"{list(spec.submodule_search_locations)}")


@dataclasses.dataclass(frozen=True)
class _Template:
    gm: np.ndarray        # float32, GM probability restricted to the brain mask
    wm: np.ndarray
    distance: np.ndarray  # float32 mm outside the brain mask, 0 inside
    world_to_voxel: np.ndarray


@functools.cache
def _template() -> _Template:
    """Template maps, loaded once per process (workers each pay this once)."""
    images = {k: nib.load(template_path(k)) for k in ("t1", "gm", "wm")}
    brain = np.asarray(images["t1"].dataobj) > 0
    zooms = images["t1"].header.get_zooms()[:3]
    # One distance map gives both the soft brain edge (1 - d matches the linear interpolation of
    # the binary mask across the boundary) and the skull/scalp shells outside it.
    distance = ndimage.distance_transform_edt(~brain, sampling=zooms).astype(np.float32)
    maps = {k: np.where(brain, np.asarray(images[k].dataobj, np.float32) / 255.0, 0.0)
            for k in ("gm", "wm")}
    return _Template(gm=maps["gm"].astype(np.float32), wm=maps["wm"].astype(np.float32),
                     distance=distance, world_to_voxel=np.linalg.inv(images["t1"].affine))


def tissue_labels(tissue: np.ndarray) -> np.ndarray:
    """Labels from tissue probabilities [..., 3] (CSF, GM, WM): argmax + 1 where the brain
    (their sum) covers at least half the voxel, 0 elsewhere. The rule every phantom label obeys."""
    brain = tissue.sum(axis=-1) >= 0.5
    return np.where(brain, np.argmax(tissue, axis=-1) + 1, 0).astype(np.uint8)


@dataclasses.dataclass
class Subject:
    case_id: str
    image: np.ndarray     # int16 [X, Y, Z] in the stored orientation
    label: np.ndarray     # uint8 [X, Y, Z], == tissue_labels(tissue)
    tissue: np.ndarray    # float32 [X, Y, Z, 3] (CSF, GM, WM) after partial-volume averaging
    affine: np.ndarray    # voxel -> RAS mm of the stored arrays


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # the logistic function, without exp overflow


def _rotation(angles_rad):
    """Rotation about x, then y, then z."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        matrix = r @ matrix
    return matrix


def _smooth_field(rng, axes_mm, control_mm, channels):
    """Random smooth field [channels, X, Y, Z], unit variance per point, on the 1D axes' grid.

    A tensor product of Gaussian bumps on a coarse control lattice, in the spirit of free-form
    deformations (Rueckert et al. 1999): separable, so the cost is a few small contractions
    rather than a 3D convolution. np.einsum without BLAS keeps it bit-identical in any process.
    """
    bases = []
    for axis in axes_mm:
        count = int(np.ceil((axis[-1] - axis[0]) / control_mm)) + 3
        centres = np.linspace(axis[0] - control_mm, axis[-1] + control_mm, count)
        basis = np.exp(-0.5 * ((axis[:, None] - centres) / control_mm) ** 2)
        # Unit-norm rows: with N(0, 1) coefficients every point then has unit variance.
        bases.append(basis / np.linalg.norm(basis, axis=1, keepdims=True))
    coef = rng.standard_normal((channels,) + tuple(b.shape[1] for b in bases))
    field = np.einsum("nabc,kc->nabk", coef, bases[2])
    field = np.einsum("nabk,jb->najk", field, bases[1])
    return np.einsum("najk,ia->nijk", field.astype(np.float32), bases[0].astype(np.float32))


def _slab_mean(volume, n_sub):
    """Average groups of n_sub[a] consecutive samples along each of the first three axes."""
    shape = volume.shape
    split = []
    for axis in range(3):
        split += [shape[axis] // n_sub[axis], n_sub[axis]]
    return volume.reshape(tuple(split) + shape[3:]).mean(axis=(1, 3, 5), dtype=np.float32)


def check_domains(domains) -> list[str]:
    """The names, or ValueError naming the unknown ones and the registry."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"unknown phantom domain(s) {unknown or list(domains)}; "
                         f"allowed: {sorted(DOMAINS)}")
    return list(domains)


def _domain_key(domain: str) -> int:
    # Stable across registry edits and across the subset of domains asked for.
    return zlib.crc32(domain.encode())


@dataclasses.dataclass(frozen=True)
class _Draw:
    """The random parts of one subject that precede its fields, in the order they are drawn."""
    means: np.ndarray     # jittered tissue means, float32 [6]
    rotation: np.ndarray  # [3, 3]
    scale: np.ndarray     # [3]
    shift: np.ndarray     # mm [3]
    skull_mm: float
    scalp_mm: float
    elastic_mm: float


def _draw(rng, params: Domain) -> _Draw:
    jitter = 1.0 + params.contrast_jitter * rng.standard_normal(6)
    means = (np.array(params.means) * jitter).astype(np.float32)
    rotation = _rotation(np.deg2rad(rng.uniform(-5.0, 5.0, 3)))
    scale = rng.uniform(0.92, 1.08) * (1.0 + rng.uniform(-0.02, 0.02, 3))
    shift = rng.uniform(-4.0, 4.0, 3)
    skull_mm, scalp_mm = rng.uniform(3.0, 5.0), rng.uniform(4.0, 6.0)
    elastic_mm = rng.uniform(2.0, 3.0)
    return _Draw(means, rotation, scale, shift, skull_mm, scalp_mm, elastic_mm)


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The output grid in RAS axis order (the stored orientation is applied at the end)."""
    stored: np.ndarray    # the stored orientation, as nibabel's ornt array
    nominal: np.ndarray   # the domain's spacing, RAS axis order
    spacing: np.ndarray   # nominal * spacing_scale
    shape: np.ndarray
    origin: np.ndarray
    n_sub: list           # sub-slices rendered per voxel along each axis
    fine_axes: list       # mm coordinates of the rendered (sub-slice) samples per axis


def _grid(params: Domain, spacing_scale: float) -> _Grid:
    stored = orientations.axcodes2ornt(params.orientation)
    nominal = np.empty(3)
    nominal[stored[:, 0].astype(int)] = params.spacing
    spacing = nominal * spacing_scale
    shape = np.round(HEAD_FOV_MM / spacing).astype(int)
    origin = HEAD_CENTRE_MM - (shape - 1) / 2 * spacing
    # Thick slices integrate the slab: render ~1 mm sub-slices and average them (partial volume).
    n_sub = [int(round(s)) if s >= 1.5 else 1 for s in nominal]
    fine_axes = [origin[a] - spacing[a] / 2 + (np.arange(shape[a] * n_sub[a]) + 0.5)
                 * spacing[a] / n_sub[a] for a in range(3)]
    return _Grid(stored, nominal, spacing, shape, origin, n_sub, fine_axes)


def _template_coords(tpl: _Template, rng, draw: _Draw, fine_axes) -> np.ndarray:
    """Template voxel coordinates [3, X, Y, Z] of every rendered sample."""
    # Subject mm -> template voxel: y = c + R diag(1/scale) (x - c) + shift + u(x).
    linear = tpl.world_to_voxel[:3, :3] @ draw.rotation @ np.diag(1.0 / draw.scale)
    offset = (tpl.world_to_voxel[:3, :3] @ (HEAD_CENTRE_MM + draw.shift)
              + tpl.world_to_voxel[:3, 3])
    # Elastic displacement with an expected RMS length of elastic_mm, in template voxels.
    coords = _smooth_field(rng, fine_axes, control_mm=30.0, channels=3)
    to_voxel = tpl.world_to_voxel[:3, :3] * draw.elastic_mm / np.sqrt(3.0)
    coords = np.einsum("mn,nijk->mijk", to_voxel.astype(np.float32), coords)
    centred = [(axis - HEAD_CENTRE_MM[a]).astype(np.float32) for a, axis in enumerate(fine_axes)]
    for k in range(3):
        coords[k] += np.float32(offset[k])
        coords[k] += (linear[k, 0] * centred[0]).astype(np.float32)[:, None, None]
        coords[k] += (linear[k, 1] * centred[1]).astype(np.float32)[None, :, None]
        coords[k] += (linear[k, 2] * centred[2]).astype(np.float32)[None, None, :]
    return coords


def _render(tpl: _Template, coords, draw: _Draw, n_sub):
    """(signal, tissue [..., 3]) on the output grid: the template's tissues sampled at
    `coords`, with the skull and scalp around them, each slab averaged."""
    means = draw.means
    distance = ndimage.map_coordinates(tpl.distance, coords, order=1, mode="constant",
                                       cval=100.0, output=np.float32)
    # Tissue maps only where the brain reaches: two thirds of the field of view is not brain and
    # sampling dominates the cost of a subject.
    inside = distance < 1.0
    points = coords[:, inside]
    del coords
    gm, wm = np.zeros_like(distance), np.zeros_like(distance)
    gm[inside] = ndimage.map_coordinates(tpl.gm, points, order=1, output=np.float32)
    wm[inside] = ndimage.map_coordinates(tpl.wm, points, order=1, output=np.float32)
    csf = np.clip(np.clip(1.0 - distance, 0.0, 1.0) - gm - wm, 0.0, 1.0)
    outside = np.clip(1.0 - (csf + gm + wm), 0.0, 1.0)
    # Skull (dark on T1) then scalp and fat (bright) as soft shells by distance from the brain.
    head = _sigmoid((draw.skull_mm + draw.scalp_mm - distance) / 0.5)
    scalp = head * _sigmoid((distance - draw.skull_mm) / 0.5)
    signal = (outside * ((1.0 - head) * means[0] + (head - scalp) * means[4] + scalp * means[5])
              + csf * means[1] + gm * means[2] + wm * means[3])
    # Image and tissue maps see the same slab average, so labels follow what the image shows.
    tissue = np.stack([_slab_mean(m, n_sub) for m in (csf, gm, wm)], axis=-1)
    return _slab_mean(signal, n_sub), tissue


def _acquire(signal, rng, params: Domain, grid: _Grid) -> np.ndarray:
    """The stored intensities (before reorientation) a scanner records of `signal`."""
    # Multiplicative low-frequency bias field, the intensity non-uniformity model of Sled et al.
    # 1998 (N3): a smooth log-field on a coarse lattice.
    out_axes = [grid.origin[a] + np.arange(grid.shape[a]) * grid.spacing[a] for a in range(3)]
    log_bias = _smooth_field(rng, out_axes, control_mm=60.0, channels=1)[0]
    log_bias -= np.float32(log_bias.mean())  # a global gain is the contrast jitter's job
    log_bias *= np.float32(params.bias_std)
    signal *= np.exp(log_bias)
    # Gaussian PSF in mm; the through-slice PSF is already the slab average.
    sigma_vox = params.psf_fwhm_mm / 2.3548 / grid.spacing
    signal = ndimage.gaussian_filter(signal, sigma=sigma_vox * (grid.nominal < 1.5), truncate=3.0)
    # Magnitude of complex Gaussian noise: the Rician model of MR magnitude images
    # (Gudbjartsson & Patz 1995), which lifts the air above zero.
    real = signal + params.noise_std * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = params.noise_std * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real ** 2 + imag ** 2)
    return np.clip(np.round(params.offset + params.gain * magnitude), 0, params.max_value)


def make_subject(domain: str, index: int, seed: int = 0, spacing_scale: float = 1.0,
                 contrast_of: str | None = None) -> Subject:
    """Render subject `index` of `domain`; a pure function of (domain, index, seed).

    spacing_scale > 1 coarsens the grid (same field of view) for fast tests. `contrast_of`
    renders the same subject (anatomy, pose, grid, and the same random draws for bias field
    and noise) with another domain's tissue contrast and acquisition (bias strength, noise
    level, PSF, stored scale): the true paired image a translation to that domain should
    produce, which unpaired data never has.
    """
    params = DOMAINS[check_domains([domain])[0]]
    look = params if contrast_of is None else DOMAINS[check_domains([contrast_of])[0]]
    tpl = _template()
    rng = np.random.default_rng([seed, _domain_key(domain), index])
    # The jitter draws are the same whichever contrast is rendered: one subject, two looks.
    draw = _draw(rng, dataclasses.replace(look, contrast_jitter=params.contrast_jitter))
    grid = _grid(params, spacing_scale)
    signal, tissue = _render(tpl, _template_coords(tpl, rng, draw, grid.fine_axes), draw,
                             grid.n_sub)
    image = _acquire(signal, rng, dataclasses.replace(look, spacing=params.spacing), grid)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(grid.spacing)
    affine[:3, 3] = grid.origin
    # Reorient from the RAS rendering grid to the stored axis order and flips.
    to_stored = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), grid.stored)
    affine = affine @ orientations.inv_ornt_aff(to_stored, tuple(grid.shape))
    image = orientations.apply_orientation(image.astype(np.int16), to_stored)
    tissue = orientations.apply_orientation(tissue, to_stored)
    return Subject(case_id=f"{domain}_{index:03d}", image=np.ascontiguousarray(image),
                   label=tissue_labels(tissue), tissue=np.ascontiguousarray(tissue),
                   affine=affine)


def _save_atomic(array, affine, path: Path):
    """Write next to the target, then rename: a reader never sees half a file."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_write(path, None) as tmp:
        nib.save(image, tmp)


def _write_case(task):
    root, domain, index, seed, spacing_scale = task
    subject = make_subject(domain, index, seed, spacing_scale)
    case = subject.case_id
    _save_atomic(subject.image, subject.affine, root / "imagesTr" / f"{case}_0000.nii.gz")
    _save_atomic(subject.label, subject.affine, root / "labelsTr" / f"{case}.nii.gz")
    counts = np.bincount(subject.label.ravel(), minlength=4)[1:]
    return dict(case_id=case, domain=domain, shape=subject.image.shape,
                spacing=tuple(float(s) for s in nib.affines.voxel_sizes(subject.affine)),
                axcodes="".join(nib.aff2axcodes(subject.affine)),
                stored_range=(int(subject.image.min()), int(subject.image.max())),
                fractions=counts / max(counts.sum(), 1))


def _remove_stale_cases(root: Path, keep: set[str]):
    """Delete phantom cases of an earlier, larger run in the same directory: the MSD reader
    lists imagesTr/ and refuses cases that dataset.json does not assign to a domain."""
    names = "|".join(re.escape(d) for d in DOMAINS)
    pattern = re.compile(rf"^(?:\.tmp-\d+-|\.)?(?P<case>(?:{names})_\d{{3,}})(?:_0000)?"
                         r"(?:\.partial-\d+)?\.nii\.gz$")
    for sub in ("imagesTr", "labelsTr"):
        for path in (root / sub).iterdir():
            match = pattern.match(path.name)
            left_over = path.name.startswith(".tmp-") or is_partial(path.name)
            if match and (left_over if path.name.startswith(".") else match["case"] not in keep):
                path.unlink()


def generate(output_dir, domains=("scanner_a", "scanner_b"), subjects_per_domain: int = 10,
             seed: int = 0, workers: int = 2, spacing_scale: float = 1.0, log=None) -> str:
    """Write the phantom dataset in the nnU-Net v2 / MSD layout; returns the dataset.json path.

    Bit-identical arrays for a given seed whatever `workers` is. `log`, if given, receives one
    summary line per domain.
    """
    domains = check_domains(domains)
    if subjects_per_domain < 1 or workers < 1:
        raise ValueError("subjects_per_domain and workers must be >= 1")
    root = Path(output_dir)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # dataset.json is written last, so its presence means the whole set is on disk.
    (root / "dataset.json").unlink(missing_ok=True)
    tasks = [(root, d, i, seed, spacing_scale) for d in domains for i in range(subjects_per_domain)]
    _remove_stale_cases(root, {f"{d}_{i:03d}" for _, d, i, _, _ in tasks})
    if workers == 1:
        records = [_write_case(t) for t in tasks]
    else:
        # spawn, not fork: callers (the demo, tests) may already have TensorFlow threads running.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            records = pool.map(_write_case, tasks, chunksize=1)

    channels = {DOMAINS[d].channel for d in domains}
    dataset = {
        "name": "uda_tf_phantom",
        "description": f"uda_tf phantom: MNI152 2009a anatomy, domains {', '.join(domains)}, "
                       f"seed {seed}",
        "channel_names": {"0": channels.pop() if len(channels) == 1 else "MRI"},
        "labels": dict(LABELS),
        "numTraining": len(records),
        "file_ending": ".nii.gz",
        "domains": {d: [r["case_id"] for r in records if r["domain"] == d] for d in domains},
    }
    path = root / "dataset.json"
    with atomic_write(path) as f:
        f.write(json.dumps(dataset, indent=2) + "\n")
    if log is not None:
        for d in domains:
            rec = [r for r in records if r["domain"] == d]
            frac = np.mean([r["fractions"] for r in rec], axis=0)
            low = min(r["stored_range"][0] for r in rec)
            high = max(r["stored_range"][1] for r in rec)
            log(f"{d}: {len(rec)} cases, shape {rec[0]['shape']}, spacing "
                f"{'x'.join(f'{s:g}' for s in rec[0]['spacing'])} mm, stored {rec[0]['axcodes']} "
                f"int16 [{low}, {high}], CSF/GM/WM {frac[0]:.2f}/{frac[1]:.2f}/{frac[2]:.2f}")
    return str(path)


# Flags are defined on demand (by run) so that importing this module as a library, e.g. from
# the demo next to other CLIs, cannot collide with their flag names.
