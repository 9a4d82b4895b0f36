"""Geometry round trips: preprocess -> invert lands on the original grid with the original
affine, the recorded prepared affine places voxels where they were, and apply_geometry
repeats the recorded steps on another array."""
import nibabel as nib
import numpy as np
import pytest

from uda_tf.data import io, layouts, preprocess

SHAPE = (18, 22, 12)


def _ramp_case(tmp_path, spacing, lps):
    """Image = linear ramp in world mm; label = a block kept inside the foreground; a zero
    border (background) so the foreground crop has something to remove."""
    spacing = np.asarray(spacing, float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-7.0, 3.0, 11.0]
    if lps:
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(float)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    image = (200 + world[..., 0] + 2 * world[..., 1] + 3 * world[..., 2]).astype(np.float32)
    inside = np.zeros(SHAPE, bool)
    inside[2:-3, 3:-2, 1:-2] = True
    image[~inside] = 0
    label = np.zeros(SHAPE, np.uint8)
    label[5:12, 6:15, 3:8] = 1
    label[7:10, 8:12, 4:6] = 2
    paths = [str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz")]
    nib.save(nib.Nifti1Image(image, affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return layouts.CaseRecord("c", "d", *paths), image, label, affine


CONFIGS = {
    "sagittal_crop_same_spacing": dict(spacing=(1.0, 1.5, 2.0), size=(30, 16, 20),
                                       slice_axis="sagittal", crop_foreground=True,
                                       clip_percentiles=(0, 100)),
    "coronal_cubic_zscore": dict(spacing=(1.0, 1.5, 2.0), size=(24, 14),
                                 slice_axis="coronal", image_interpolation="cubic",
                                 normalization="zscore", normalize_in_foreground=True,
                                 clip_percentiles=(0, 100)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lps", [False, True])
def test_restore_lands_on_the_original_grid_exactly(tmp_path, name, lps):
    case, image, label, affine = _ramp_case(tmp_path, (1.0, 1.5, 2.0), lps)
    config = preprocess.PreprocessConfig(**CONFIGS[name])
    prepared = preprocess.prepare_case(case, config, label_values=3)
    record, manifest_pre = prepared.record, config.to_manifest()
    assert prepared.image.shape[:2] == tuple(config.size[:2])
    # Same spacing in and out: restoring the prepared label gives the file back exactly.
    restored = preprocess.restore_to_original(prepared.label, record, manifest_pre)
    np.testing.assert_array_equal(restored, label)
    out = str(tmp_path / "restored.nii.gz")
    io.write_volume(out, restored, record["original_affine"])
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(case.label_path).affine)
    assert nib.load(out).shape == nib.load(case.label_path).shape


def test_restore_after_resampling_and_crop(tmp_path):
    case, image, label, affine = _ramp_case(tmp_path, (1.0, 1.5, 2.0), lps=True)
    config = preprocess.PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(12, 16, 8),
                                         crop_foreground=True, slice_axis="sagittal")
    prepared = preprocess.prepare_case(case, config, label_values=3)
    restored = preprocess.restore_to_original(prepared.label, prepared.record,
                                              config.to_manifest())
    assert restored.shape == label.shape
    assert (restored == label).mean() > 0.93  # coarser grid: only boundary voxels differ
    for value in (1, 2):  # each structure's centre stays put (within a voxel)
        np.testing.assert_allclose(np.argwhere(restored == value).mean(0),
                                   np.argwhere(label == value).mean(0), atol=1.0)
    # probabilities [H, W, D, K] go back with linear interpolation
    probs = np.eye(3, dtype=np.float32)[prepared.label]
    back = preprocess.restore_to_original(probs, prepared.record, config.to_manifest(), order=1)
    assert back.shape == (*label.shape, 3)
    assert (back.argmax(-1) == restored).mean() > 0.97


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_prepared_affine_places_voxels_in_world_mm(tmp_path, slice_axis):
    case, image, label, affine = _ramp_case(tmp_path, (1.0, 1.5, 2.0), lps=True)
    config = preprocess.PreprocessConfig(spacing=(1.2, 1.7, 2.5), size=(14, 12),
                                         crop_foreground=True, slice_axis=slice_axis,
                                         clip_percentiles=(0, 100))
    prepared = preprocess.prepare_case(case, config, label_values=3)
    record = prepared.record
    offset, scale = preprocess.intensity_transform(record["intensity"], "minmax")
    matrix = np.asarray(record["prepared_affine"])
    inner = np.argwhere(prepared.image > 0.05)
    inner = inner[(inner > 1).all(1) & (inner < np.array(prepared.image.shape) - 2).all(1)]
    world = np.c_[inner, np.ones(len(inner))] @ matrix.T
    expected = (200 + world[:, 0] + 2 * world[:, 1] + 3 * world[:, 2] - offset) / scale
    got = prepared.image[tuple(inner.T)]
    # interior voxels of a linear ramp: linear resampling is exact
    np.testing.assert_allclose(got[np.abs(got - expected) < 0.2], expected[
        np.abs(got - expected) < 0.2], atol=1e-4)
    assert np.mean(np.abs(got - expected) < 1e-3) > 0.8
    np.testing.assert_allclose(record["prepared_spacing"],
                               np.sqrt((matrix[:3, :3] ** 2).sum(0)), rtol=1e-9)


def test_apply_geometry_repeats_the_recorded_steps(tmp_path):
    case, image, label, affine = _ramp_case(tmp_path, (1.0, 1.5, 2.0), lps=False)
    config = preprocess.PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(10, 12),
                                         crop_foreground=True, slice_axis="coronal",
                                         clip_percentiles=(0, 100))
    prepared = preprocess.prepare_case(case, config, label_values=3)
    volume = io.read_volume(case.image_path)
    # pad with the raw clip floor, as prepare pads with its normalised value
    raw = preprocess.apply_geometry(volume.array, volume.spacing, prepared.record,
                                    config.to_manifest(),
                                    fill=prepared.record["intensity"]["p_low"])
    offset, scale = preprocess.intensity_transform(prepared.record["intensity"], "minmax")
    np.testing.assert_allclose((raw - offset) / scale, prepared.image, atol=1e-4)
    labels = preprocess.apply_geometry(io.read_volume(case.label_path, is_label=True).array,
                                       volume.spacing, prepared.record, config.to_manifest(),
                                       order=0)
    np.testing.assert_array_equal(labels, prepared.label)


def test_context_slices_stack_neighbours_with_repeated_edges():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    stacked = preprocess.slices_with_context(volume, 1)
    assert stacked.shape == (4, 2, 3, 3)
    np.testing.assert_array_equal(stacked[0, ..., 0], volume[:, :, 0])  # edge repeated
    np.testing.assert_array_equal(stacked[0, ..., 2], volume[:, :, 1])
    np.testing.assert_array_equal(stacked[2, ..., 0], volume[:, :, 1])
    np.testing.assert_array_equal(stacked[2, ..., 1], volume[:, :, 2])
    np.testing.assert_array_equal(stacked[3, ..., 2], volume[:, :, 3])
    np.testing.assert_array_equal(preprocess.slices_with_context(volume)[..., 0],
                                  np.moveaxis(volume, 2, 0))


def test_old_manifest_preprocessing_still_reads():
    old = {"orientation": "RAS", "spacing": [2, 2, 2], "size": [96, 112],
           "interpolation": {"image": "linear", "label": "nearest"},
           "clip_percentiles": [1, 99], "normalization": "minmax"}
    config = preprocess.PreprocessConfig.from_manifest(old)
    assert config.slice_axis == "axial" and not config.crop_foreground
