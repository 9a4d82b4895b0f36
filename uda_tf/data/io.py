"""Reading scans into the RAS+ voxel order every other part of uda_tf assumes.

Geometry is data (nnU-Net / MONAI convention): a `Volume` carries the on-disk affine and shape
alongside the reoriented array, so predictions can be written back in the original geometry
with `ras_to_original`.

NIfTI (`.nii`, `.nii.gz`) is read with nibabel. 2D pictures (DRIVE's `.tif`/`.gif`, STARE's
`.ppm` or `.ppm.gz`, `.png`, `.jpg`, `.bmp`) are read with Pillow and become single-slice
volumes with 1 mm pixels and an identity affine, so the same preprocessing and pipeline apply:
rows run along the first (H) axis, columns along the second (W).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import nibabel as nib
import numpy as np
from absl import logging
from nibabel import orientations

_RAS = orientations.axcodes2ornt(("R", "A", "S"))
NIFTI_ENDINGS = (".nii.gz", ".nii")
PICTURE_ENDINGS = (".png", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jpg", ".jpeg", ".bmp",
                   ".ppm.gz", ".pgm.gz")
# How an RGB picture becomes channels: the green channel alone (the usual choice for retinal
# vessels, whose contrast is highest there), luminance, or all three channels.
COLOR_MODES = ("green", "gray", "rgb")
# The most voxels (pixels) a file's header may declare; checked before any voxel is read, so a
# forged header or a gzip bomb cannot make a reader allocate gigabytes. 2**27 = 512^3 voxels
# (a 512 MB float32 volume). prepare's --max_voxels raises it per run; other callers (predict,
# evaluate) read with this default.
MAX_VOXELS = 2**27
# Voxel sizes outside this range (mm) are header corruption, not a scanner's choice.
SPACING_RANGE = (1e-4, 1e4)
# How far qform and sform may differ (mm, largest matrix element relative to the voxel size
# or translation) and how far from 90 degrees the voxel axes may lean (cosine) before a file
# is reported: both stored in float32, so exact equality is not expected.
AFFINE_TOLERANCE = 1e-3
SHEAR_TOLERANCE = 1e-3


class NiftiError(ValueError):
    """A scan file that exists but cannot be used (unreadable, truncated, wrong dimensionality,
    NaN voxels, ...). The message names the file. (The name predates 2D pictures.)"""


def is_picture(path: str) -> bool:
    return path.lower().endswith(PICTURE_ENDINGS)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A 3D array in RAS+ voxel order plus its geometry.

    `array` is [X, Y, Z], or [X, Y, Z, C] for a multi-channel picture read with color="rgb".
    Axis 0 runs towards Right, 1 towards Anterior, 2 towards Superior; `affine` maps
    those voxel indices to world mm and `spacing` is the voxel size along each of those axes.
    The `original_*` fields describe the file as stored on disk.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    original_spacing: tuple[float, float, float]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    # From the affine, not the header pixdim: the affine is what places voxels in space, and
    # the two disagree in some malformed files.
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((columns**2).sum(axis=0)))


def _limit_text(max_voxels: int) -> str:
    return (f"more than the limit max_voxels={max_voxels} (prepare's --max_voxels raises it, "
            "if the scan really is that large)")


def _check_size(img, path: str, max_voxels: int) -> None:
    """Before any voxel is read: the header's voxel count against `max_voxels`, and the file
    (or, for .nii.gz, the gzip stream) long enough to hold them, so a forged or truncated
    header fails here instead of after allocating what it claims."""
    shape = tuple(int(n) for n in img.shape)
    voxels = int(np.prod(shape, dtype=object))
    if voxels > max_voxels:
        raise NiftiError(f"{path}: its header declares shape {shape} = {voxels} voxels, "
                         + _limit_text(max_voxels))
    if not isinstance(img, nib.Nifti1Image):
        return
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    # The proxy's offset is the file's vox_offset (nibabel resets the loaded header's to 0).
    offset = getattr(img.dataobj, "offset", None)
    expected = int(img.header.get_data_offset() if offset is None else offset) + \
        voxels * itemsize
    if path.lower().endswith(".gz"):
        if _gzip_size_at_least(path, expected):
            return
        raise NiftiError(f"cannot read voxel data of {path} (truncated or corrupt file?): its "
                         f"header declares shape {shape} of {np.dtype(img.get_data_dtype())} "
                         f"({expected} bytes once decompressed), the compressed stream holds "
                         "fewer; nothing was allocated for them")
    size = os.path.getsize(path)
    if size < expected:
        raise NiftiError(f"cannot read voxel data of {path} (truncated or corrupt file?): its "
                         f"header declares shape {shape} of {np.dtype(img.get_data_dtype())}, "
                         f"{expected} bytes with the header, the file has {size}")


def _gzip_size_at_least(path: str, expected: int) -> bool:
    """Whether the gzip file `path` decompresses to at least `expected` bytes.

    The trailer's ISIZE (size mod 2**32 of the last member) answers at once for the usual
    single-member file; otherwise (several members, a size over 4 GiB, a truncated file whose
    last bytes are no trailer) the stream is decompressed and counted, never kept: memory
    stays at one block whatever the file claims.
    """
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
    except OSError:
        return False  # shorter than a gzip trailer
    if expected < 2**32 and isize == expected:
        return True
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < expected:
                block = f.read(min(1 << 20, expected - total))
                if not block:
                    break
                total += len(block)
    except Exception:  # EOFError, zlib.error, BadGzipFile: a truncated or corrupt stream
        return False
    return total >= expected


def _check_pixdim(img, path: str) -> None:
    """nibabel replaces a zero (or -0.0) voxel size by 1 mm when it loads a header, with a
    log line that names no file; a scan with an invented voxel size would be resampled
    wrongly, so the stored value is checked here."""
    klass = type(img.header)
    try:
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            stored = klass(f.read(klass.sizeof_hdr), check=False)
        pixdim = [float(v) for v in stored["pixdim"][1:4]]
    except Exception:  # unreadable here means unreadable for nibabel too: it reported it
        return
    low, high = SPACING_RANGE
    bad = [v for v in pixdim[:len(img.shape)] if not (np.isfinite(v) and low <= abs(v) <= high)]
    if bad:
        raise NiftiError(
            f"{path}: voxel size pixdim[1:4] = {tuple(pixdim)} (used for its affine: no sform) "
            f"is not usable; each must be between {low:g} and {high:g} mm (zero, -0, NaN or "
            "an absurd value is header corruption)")


def _check_geometry(img, path: str) -> None:
    """Voxel sizes must be usable; a qform/sform disagreement or a sheared affine is reported
    (docs/CONTRACTS.md): nibabel uses the sform when both are set, and resampling treats the
    voxel axes as perpendicular."""
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = voxel_spacing(affine) if np.isfinite(affine).all() else None
    if spacing is not None:
        low, high = SPACING_RANGE
        bad = [s for s in spacing if not low <= s <= high]
        if bad:
            raise NiftiError(
                f"{path}: voxel size {tuple(round(s, 6) for s in spacing)} mm (from its "
                f"affine / pixdim) is not usable; each must be between {low:g} and {high:g} mm "
                "(a zero, NaN or absurd pixdim, or a zero column in the sform/qform)")
    header = img.header
    if not isinstance(header, nib.Nifti1Header):
        return
    try:
        codes = int(header["sform_code"]), int(header["qform_code"])
    except (TypeError, ValueError):
        codes = (0, 0)
    if codes[0] <= 0:  # the affine comes from pixdim (qform or none): check it as stored
        _check_pixdim(img, path)
    if codes[0] > 0 and codes[1] > 0:
        try:
            qform = np.asarray(header.get_qform(), np.float64)
            sform = np.asarray(header.get_sform(), np.float64)
        except Exception:  # a corrupt quaternion: nibabel uses the sform anyway
            qform = sform = None
        if qform is not None and np.isfinite(qform).all() and np.isfinite(sform).all():
            scale = max(1.0, float(np.abs(sform).max()))
            difference = float(np.abs(qform - sform).max())
            if difference > AFFINE_TOLERANCE * scale:
                logging.warning(
                    "%s: its qform and sform disagree (largest difference %.4g mm); uda_tf "
                    "uses the sform, as nibabel does (other tools may use the qform: check "
                    "which is right and fix the file's header)", path, difference)
    if spacing is not None:
        columns = affine[:3, :3] / np.asarray(spacing)
        cosines = np.abs(columns.T @ columns - np.eye(3)).max()
        if cosines > SHEAR_TOLERANCE:
            angle = float(np.degrees(np.arcsin(min(1.0, cosines))))
            logging.warning(
                "%s: its affine is sheared (voxel axes %.3g degrees from perpendicular); "
                "uda_tf resamples it as if the axes were perpendicular, with the voxel sizes "
                "%s mm, so the prepared geometry is approximate", path, angle,
                tuple(round(s, 4) for s in spacing))


def _load(path: str) -> nib.spatialimages.SpatialImage:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several unrelated types for corrupt files
        raise NiftiError(f"cannot read NIfTI file {path}: {e}") from e
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf":  # complex (imaginary part would be dropped) or RGB records
        raise NiftiError(f"{path} stores {dtype} voxels; expected real-valued scalar voxels "
                         "(integer or float)")
    if len(img.shape) > 3:
        # Some writers store a 3D volume as x*y*z*1.
        img = nib.funcs.squeeze_image(img)
    if len(img.shape) != 3:
        raise NiftiError(
            f"expected a 3D volume in {path}, got shape {tuple(img.shape)} "
            "(multi-channel or 4D images are not supported)"
        )
    return img


def read_volume(path: str, is_label: bool = False, *, color: str = "green",
                binarize: bool = False, max_voxels: int | None = None) -> Volume:
    """Reads `path` and reorients it like `nib.as_closest_canonical` (nearest RAS+ axes).

    Images come back as float32 with the header scaling applied; labels as uint8, and a label
    file holding non-integer, non-finite or out-of-range values is an error naming the file.
    `binarize` turns a mask stored as 0/1, 0/255 or probabilities into 0/1 (value >= half the
    maximum). Pictures are read with Pillow (`color` picks their channels, see COLOR_MODES).
    A header declaring more than `max_voxels` (default MAX_VOXELS) voxels, or more than the
    file holds, is an error before any voxel is read; unusable voxel sizes are an error, a
    qform/sform disagreement or a sheared affine a warning naming the file.
    """
    max_voxels = MAX_VOXELS if max_voxels is None else int(max_voxels)
    if is_picture(path):
        return read_picture(path, is_label, color=color, binarize=binarize,
                            max_voxels=max_voxels)
    img = _load(path)
    _check_size(img, path, max_voxels)
    _check_geometry(img, path)
    original_affine = np.asarray(img.affine, dtype=np.float64)
    try:
        if not np.isfinite(original_affine).all():
            raise ValueError("the affine holds NaN or infinite values")
        canonical = nib.as_closest_canonical(img)
    except (ValueError, orientations.OrientationError) as e:  # a corrupt qform/sform
        raise NiftiError(f"unusable voxel-to-world affine in {path} (corrupt header?): "
                         f"{e}") from e
    try:
        if is_label:
            values = np.asanyarray(canonical.dataobj)
            array = _as_label_array(values, path, binarize)
        else:
            array = canonical.get_fdata(dtype=np.float32)
    except NiftiError:
        raise
    except Exception as e:  # EOFError / zlib.error for a truncated .nii.gz, among others
        raise NiftiError(
            f"cannot read voxel data of {path} (truncated or corrupt file?): "
            f"{type(e).__name__}: {e}"
        ) from e
    if not is_label:
        _check_finite(array, path)
    affine = np.asarray(canonical.affine, dtype=np.float64)
    return Volume(
        array=np.ascontiguousarray(array),
        affine=affine,
        spacing=voxel_spacing(affine),
        original_shape=tuple(int(n) for n in img.shape),
        original_affine=original_affine,
        original_spacing=voxel_spacing(original_affine),
    )


def read_channels(paths, *, color: str = "green", max_voxels: int | None = None) -> Volume:
    """An image of one or more channel files (nnU-Net's <case>_0000, _0001, ...): channel 0
    as `read_volume` reads it, with the others stacked on a last axis, [X, Y, Z, C]. Every
    channel must lie on channel 0's grid (shape and affine); a NiftiError names both files."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    first = read_volume(paths[0], color=color, max_voxels=max_voxels)
    if len(paths) == 1:
        return first
    arrays = [first.array]
    for k, path in enumerate(paths[1:], start=1):
        other = read_volume(path, max_voxels=max_voxels)
        check_same_grid(first, other, paths[0], path, f"channel {k}")
        arrays.append(other.array)
    return dataclasses.replace(first, array=np.stack(arrays, axis=-1))


def check_same_grid(image: Volume, other: Volume, image_path: str, other_path: str,
                    what: str) -> None:
    """`other` (a label, mask or another channel, read from `other_path`) lies on the grid
    of `image`: the same shape and affine (to 1e-3 mm); a NiftiError names both files."""
    if tuple(other.array.shape[:3]) != tuple(image.array.shape[:3]):
        raise NiftiError(
            f"{what} {other_path} has shape {tuple(other.original_shape)} but its image "
            f"{image_path} has shape {tuple(image.original_shape)}"
        )
    difference = float(np.abs(np.asarray(other.affine) - np.asarray(image.affine)).max())
    if difference > 1e-3:
        raise NiftiError(
            f"{what} {other_path} has a different affine from its image {image_path} "
            f"(largest difference {difference:.4g} mm): they are not on the same grid"
        )


def _check_finite(array: np.ndarray, path: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise NiftiError(f"image {path} contains {bad} NaN or infinite voxels")


def _binarized(values: np.ndarray, path: str) -> np.ndarray:
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        raise NiftiError(f"label file {path} contains NaN or infinite values")
    top = values.max() if values.size else 0
    if top <= 0:
        return np.zeros(values.shape, np.uint8)
    return (values >= top / 2).astype(np.uint8)


def _as_label_array(values: np.ndarray, path: str, binarize: bool = False) -> np.ndarray:
    if binarize:
        return _binarized(values, path)
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < 0 or values.max() > 255):
            raise NiftiError(f"label file {path} has values outside 0..255")
        return values.astype(np.uint8)
    if not np.all(np.isfinite(values)):
        raise NiftiError(f"label file {path} contains NaN or infinite values")
    rounded = np.rint(values)
    if not np.allclose(rounded, values, atol=1e-3):
        raise NiftiError(f"label file {path} holds non-integer values")
    if rounded.size and (rounded.min() < 0 or rounded.max() > 255):
        raise NiftiError(f"label file {path} has values outside 0..255")
    return rounded.astype(np.uint8)


def picture_shape(path: str) -> tuple[int, int, int]:
    """The [rows, cols, 1] shape `read_picture` gives `path`, from its header alone."""
    from PIL import Image

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f, Image.open(f) as picture:
        width, height = picture.size
    return height, width, 1


def _open_picture(path: str, max_voxels: int | None = None):
    from PIL import Image  # a dependency only of 2D datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if path.lower().endswith(".gz"):  # STARE is distributed as im0001.ppm.gz
            with gzip.open(path, "rb") as f:
                picture = Image.open(f)
                _check_picture_size(picture, path, max_voxels)
                picture.load()
        else:
            picture = Image.open(path)
            _check_picture_size(picture, path, max_voxels)
            picture.load()
    except NiftiError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow checks the declared size in Image.open, before ours can.
        raise NiftiError(f"{path}: its header declares more pixels than Pillow decodes (its "
                         f"decompression-bomb limit: {e})") from e
    except Exception as e:  # PIL raises OSError/SyntaxError/ValueError for broken files
        raise NiftiError(
            f"cannot read image file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if getattr(picture, "n_frames", 1) > 1:
        raise NiftiError(f"{path} holds {picture.n_frames} frames; expected one 2D picture")
    return picture


def _check_picture_size(picture, path: str, max_voxels: int | None) -> None:
    """The pixel count a picture's header declares, before Pillow decodes it."""
    limit = MAX_VOXELS if max_voxels is None else int(max_voxels)
    width, height = picture.size
    if width * height > limit:
        raise NiftiError(f"{path}: its header declares {width}x{height} = {width * height} "
                         "pixels, " + _limit_text(limit))


def picture_array(path: str, is_label: bool = False, *, color: str = "green",
                  binarize: bool = False, max_voxels: int | None = None) -> np.ndarray:
    """[rows, cols] (or [rows, cols, 3] for color="rgb") array of a 2D picture."""
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {', '.join(COLOR_MODES)}, got {color!r}")
    picture = _open_picture(path, max_voxels)
    if picture.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
        picture = picture.convert("RGB" if picture.mode not in ("LA", "1") else "L")
    array = np.asarray(picture)
    if is_label:
        if array.ndim == 3:  # an annotation saved as RGB: any channel carries it
            array = array.max(axis=-1)
        return _as_label_array(array, path, binarize)
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1) if color == "rgb" else array
    elif color == "green":
        array = array[..., 1]
    elif color == "gray":  # ITU-R 601 luma, as PIL's convert("L")
        array = array[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        array = array[..., :3]
    _check_finite(array, path)
    return np.ascontiguousarray(array)


def read_picture(path: str, is_label: bool = False, *, color: str = "green",
                 binarize: bool = False, max_voxels: int | None = None) -> Volume:
    """A 2D picture as a single-slice volume [rows, cols, 1] (+ [3] channels for rgb)."""
    array = picture_array(path, is_label, color=color, binarize=binarize,
                          max_voxels=max_voxels)
    array = array[:, :, None] if array.ndim == 2 else array[:, :, None, :]
    affine = np.eye(4)
    shape = tuple(int(n) for n in array.shape[:3])
    return Volume(array=array, affine=affine, spacing=(1.0, 1.0, 1.0), original_shape=shape,
                  original_affine=affine.copy(), original_spacing=(1.0, 1.0, 1.0))


def canonical_geometry(
    original_shape: tuple[int, int, int], original_affine: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing `read_volume` gives a file with this on-disk shape and affine."""
    ornt = orientations.io_orientation(np.asarray(original_affine, dtype=np.float64))
    axes = [int(a) for a in ornt[:, 0]]
    spacing = voxel_spacing(original_affine)
    # ornt[i] says which RAS axis on-disk axis i becomes.
    shape = [0, 0, 0]
    ras_spacing = [0.0, 0.0, 0.0]
    for disk_axis, ras_axis in enumerate(axes):
        shape[ras_axis] = int(original_shape[disk_axis])
        ras_spacing[ras_axis] = spacing[disk_axis]
    return tuple(shape), tuple(ras_spacing)


def ras_to_original(array: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Inverse of the reorientation in `read_volume`: RAS voxel order -> on-disk order.

    Extra trailing axes (e.g. class probabilities) are carried along untouched.
    """
    ornt = orientations.io_orientation(np.asarray(original_affine, dtype=np.float64))
    back = orientations.ornt_transform(_RAS, ornt)
    return orientations.apply_orientation(array, back)


def write_volume(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    """Writes a NIfTI file (e.g. a prediction restored to the original grid)."""
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), path)
