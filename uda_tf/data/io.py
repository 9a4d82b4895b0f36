"""Reading NIfTI volumes into the RAS+ voxel order every other part of uda_tf assumes.

Geometry is data (nnU-Net / MONAI convention): a `Volume` carries the on-disk affine and shape
alongside the reoriented array, so predictions can be written back in the original geometry
with `ras_to_original`.
"""
from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
from nibabel import orientations

_RAS = orientations.axcodes2ornt(("R", "A", "S"))


class NiftiError(ValueError):
    """A NIfTI file that exists but cannot be used (unreadable, wrong dimensionality, ...)."""


@dataclasses.dataclass(frozen=True)
class Volume:
    """A 3D array in RAS+ voxel order plus its geometry.

    `array` axis 0 runs towards Right, 1 towards Anterior, 2 towards Superior; `affine` maps
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


def _load(path: str) -> nib.spatialimages.SpatialImage:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several unrelated types for corrupt files
        raise NiftiError(f"cannot read NIfTI file {path}: {e}") from e
    if len(img.shape) > 3:
        # Some writers store a 3D volume as x*y*z*1.
        img = nib.funcs.squeeze_image(img)
    if len(img.shape) != 3:
        raise NiftiError(
            f"expected a 3D volume in {path}, got shape {tuple(img.shape)} "
            "(multi-channel or 4D images are not supported)"
        )
    return img


def read_volume(path: str, is_label: bool = False) -> Volume:
    """Reads `path` and reorients it like `nib.as_closest_canonical` (nearest RAS+ axes).

    Images come back as float32 with the header scaling applied; labels as uint8, and a label
    file holding non-integer or out-of-range values is an error naming the file.
    """
    img = _load(path)
    original_affine = np.asarray(img.affine, dtype=np.float64)
    canonical = nib.as_closest_canonical(img)
    try:
        if is_label:
            values = np.asanyarray(canonical.dataobj)
            array = _as_label_array(values, path)
        else:
            array = canonical.get_fdata(dtype=np.float32)
    except NiftiError:
        raise
    except Exception as e:
        raise NiftiError(f"cannot read voxel data of {path}: {e}") from e
    if not is_label and not np.all(np.isfinite(array)):
        raise NiftiError(f"image {path} contains NaN or infinite voxels")
    affine = np.asarray(canonical.affine, dtype=np.float64)
    return Volume(
        array=np.ascontiguousarray(array),
        affine=affine,
        spacing=voxel_spacing(affine),
        original_shape=tuple(int(n) for n in img.shape),
        original_affine=original_affine,
        original_spacing=voxel_spacing(original_affine),
    )


def _as_label_array(values: np.ndarray, path: str) -> np.ndarray:
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < 0 or values.max() > 255):
            raise NiftiError(f"label file {path} has values outside 0..255")
        return values.astype(np.uint8)
    rounded = np.rint(values)
    if not np.allclose(rounded, values, atol=1e-3):
        raise NiftiError(f"label file {path} holds non-integer values")
    if rounded.size and (rounded.min() < 0 or rounded.max() > 255):
        raise NiftiError(f"label file {path} has values outside 0..255")
    return rounded.astype(np.uint8)


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
