"""Whole-volume inference (slices, Gaussian sliding window, flip TTA) and `uda_tf.evaluation.predict`:
NIfTI in, NIfTI out in the input's geometry, checked against a known mask."""
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from uda_tf.evaluation import inference

# -- inference over a toy predict_fn ------------------------------------------------------


def voxelwise(batch):
    """A 'model' whose class probabilities depend on each voxel's own intensity only."""
    p = 1.0 / (1.0 + np.exp(-8.0 * (batch[..., :1] - 0.5)))
    return np.concatenate([1.0 - p, p], axis=-1)


def test_sliding_window_reproduces_a_voxelwise_model():
    rng = np.random.default_rng(0)
    volume = rng.random((23, 17, 11, 1), dtype=np.float32)
    want = voxelwise(volume)
    for overlap in (0.0, 0.5, 0.8):
        for gaussian in (True, False):
            got = inference.sliding_window(voxelwise, volume, (8, 8, 6), overlap=overlap,
                                           gaussian=gaussian, batch_size=3)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # A volume smaller than the patch is padded, predicted and cut back.
    small = inference.sliding_window(voxelwise, volume[:5, :6, :4], (8, 8, 6))
    np.testing.assert_allclose(small, want[:5, :6, :4], rtol=1e-5, atol=1e-6)


def test_sliding_window_weights_favour_patch_centres():
    """A model that is right at a patch's centre and wrong at its border: with Gaussian
    weights the centres dominate the blend, with a plain mean the errors count fully."""
    def centre_biased(patches):
        h = patches.shape[1]
        distance = np.abs(np.arange(h) - (h - 1) / 2)[None, :, None, None, None] / (h / 2)
        p = np.clip(0.9 - distance, 0.05, 0.95) * np.ones_like(patches[..., :1])
        return np.concatenate([1 - p, p], axis=-1)

    volume = np.ones((40, 8, 8, 1), np.float32)
    weighted = inference.sliding_window(centre_biased, volume, (16, 8, 8), overlap=0.5)
    plain = inference.sliding_window(centre_biased, volume, (16, 8, 8), overlap=0.5,
                                     gaussian=False)
    inner = slice(8, 32)  # where patches overlap
    assert weighted[inner, ..., 1].mean() > plain[inner, ..., 1].mean() + 0.05
    w = inference.gaussian_weights((16, 8, 8))
    assert w.max() == w[7:9, 3:5, 3:5].max() == 1.0 and w.min() > 0
    assert inference.window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert inference.window_starts(41, 16, 0.5) == [0, 6, 12, 19, 25]


def test_predict_slices_context_and_flip_tta():
    rng = np.random.default_rng(1)
    volume = rng.random((6, 5, 9, 1), dtype=np.float32)
    seen = []

    def centre_channel(batch):
        seen.append(batch.shape)
        return voxelwise(batch[..., 1:2])  # the middle of 3 context channels

    probs = inference.predict_slices(centre_channel, volume, batch_size=4, context=1)
    np.testing.assert_allclose(probs, voxelwise(volume), rtol=1e-6)
    assert seen == [(4, 6, 5, 3), (4, 6, 5, 3), (1, 6, 5, 3)]

    def left_biased(batch):  # depends on position: flips change its output
        ramp = np.linspace(0, 1, batch.shape[1])[None, :, None, None]
        return voxelwise(batch * 0 + ramp)

    tta = inference.flip_tta(left_biased, (1,))(volume[None, :, :, 0])
    ramp = np.linspace(0, 1, 6)
    expected = (voxelwise(ramp[:, None]) + voxelwise(ramp[::-1, None])) / 2
    np.testing.assert_allclose(tta[0, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(inference.flip_tta(voxelwise, (1, 2))(volume[None, ..., 0]),
                               voxelwise(volume[None, ..., 0]), rtol=1e-5)
    with pytest.raises(ValueError, match="patch_size"):
        inference.sliding_window(voxelwise, volume, (4, 4))


# -- predict: NIfTI round trip --------------------------------------------------------------
SIZE = (24, 20)


def oblique_case(directory):
    """An oblique (12 degrees about two axes), anisotropic, non-RAS (stored S-L-P) scan of a
    bright ellipsoid; returns (path, affine, known mask on the on-disk grid)."""
    shape, spacing = (14, 30, 26), np.array([2.5, 0.9, 1.3])
    a, b = math.radians(12), math.radians(-9)
    rot_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rot_z = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    to_ras = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]])  # on-disk axes point S, L, P
    affine = np.eye(4)
    affine[:3, :3] = rot_z @ rot_x @ to_ras @ np.diag(spacing)
    affine[:3, 3] = [30.0, -12.0, 7.0]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ (np.array(shape) - 1) / 2 + affine[:3, 3]
    mask = (((world - centre) / [7.0, 9.0, 8.0]) ** 2).sum(-1) <= 1.0
    image = np.where(mask, 110.0, 10.0).astype(np.float32)
    path = os.path.join(directory, "oblique_case_0000.nii.gz")
    nib.save(nib.Nifti1Image(image, affine), path)
    return path, affine, mask


def threshold_model():
    """Foreground where the normalised intensity exceeds 0.5: logits (0, 50 (x - 0.5))."""
    import keras
    inputs = keras.Input((*SIZE, 1))
    conv = keras.layers.Conv2D(2, 1, kernel_initializer=keras.initializers.Constant(
        [[[[0.0, 50.0]]]]), bias_initializer=keras.initializers.Constant([0.0, -25.0]))
    return keras.Model(inputs, {"logits": conv(inputs)})


def inverting_translator():
    """An image -> image network giving 1 - x: contrast inverted, for --save_translation."""
    import keras
    inputs = keras.Input((*SIZE, 1))
    conv = keras.layers.Conv2D(1, 1, kernel_initializer=keras.initializers.Constant(-1.0),
                               bias_initializer=keras.initializers.Constant(1.0))
    return keras.Model(inputs, conv(inputs))


def manifest_for(directory, spacing):
    from uda_tf.data.manifest import write_manifest
    from uda_tf.data.preprocess import PreprocessConfig
    os.makedirs(directory, exist_ok=True)
    config = PreprocessConfig(spacing=spacing, size=SIZE, clip_percentiles=(0.0, 100.0))
    return write_manifest(str(directory), {
        "dataset_name": "toy", "preprocessing": config.to_manifest(), "image_shape": [*SIZE, 1],
        "num_classes": 2, "label_names": {"0": "background", "1": "blob"},
        "output": {"records": "slices", "context_slices": 0}})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from uda_tf.serving.export import export_segmentor
    from uda_tf.evaluation.predict import case_id_of
    root = tmp_path_factory.mktemp("predict")
    path, affine, mask = oblique_case(str(root))
    from uda_tf.data.io import read_volume
    ras_spacing = read_volume(path).spacing
    exact = manifest_for(root / "exact", ras_spacing)      # no resampling: exact mask expected
    resampled = manifest_for(root / "resampled", (2.0, 2.0, 2.0))
    model = export_segmentor(threshold_model(), str(root / "export"), "toy", manifest=exact,
                             warmup_batch_sizes=(1,),
                             translators={"to_target": inverting_translator()})
    assert case_id_of(path) == "oblique_case"
    return {"root": root, "path": path, "affine": affine, "mask": mask, "model": model,
            "resampled": resampled}


def test_predict_restores_the_input_geometry_exactly(exported):
    from uda_tf.evaluation.predict import load_predictor, predict_cases
    predictor = load_predictor(exported["model"])  # manifest from assets.extra
    out = str(exported["root"] / "out_exact")
    predict_cases(predictor, [("oblique_case", exported["path"])], out, save_probabilities=True,
                  save_entropy=True, say=lambda *_: None)
    labels = nib.load(os.path.join(out, "oblique_case.nii.gz"))
    np.testing.assert_allclose(labels.affine, exported["affine"], atol=1e-5)
    assert labels.shape == exported["mask"].shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(labels.dataobj), exported["mask"])
    probs = nib.load(os.path.join(out, "oblique_case_probabilities.nii.gz"))
    assert probs.shape == (*exported["mask"].shape, 2) and probs.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-5)
    entropy = np.asarray(nib.load(os.path.join(out, "oblique_case_entropy.nii.gz")).dataobj)
    assert entropy.shape == exported["mask"].shape and 0 <= entropy.min() <= entropy.max() <= 1
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left


def test_predict_writes_the_translated_scan_on_its_grid(exported, tmp_path):
    from uda_tf.evaluation.predict import load_predictor, predict_cases
    predictor = load_predictor(exported["model"], translation="to_target")
    out = str(tmp_path / "translated")
    predict_cases(predictor, [("oblique_case", exported["path"])], out, say=lambda *_: None)
    image = nib.load(os.path.join(out, "oblique_case_translated.nii.gz"))
    np.testing.assert_allclose(image.affine, exported["affine"], atol=1e-5)
    translated, mask = np.asarray(image.dataobj), exported["mask"]
    assert translated.shape == mask.shape and image.get_data_dtype() == np.float32
    # the bright ellipsoid comes back dark and its surroundings bright, each uniform
    assert translated[mask].max() < translated[~mask].min()
    assert np.ptp(translated[mask]) < 1e-5 and np.ptp(translated[~mask]) < 1e-5
    with pytest.raises(ValueError, match="--save_translation=to_source: .*returns"):
        load_predictor(exported["model"], translation="to_source")


def test_predict_with_resampling_keeps_labels_in_place(exported):
    from uda_tf.metrics import dice
    from uda_tf.evaluation.predict import load_predictor, predict_file
    predictor = load_predictor(exported["model"], manifest=exported["resampled"], tta=True)
    result = predict_file(predictor, exported["path"])
    assert result["labels"].shape == exported["mask"].shape
    np.testing.assert_allclose(result["affine"], exported["affine"], atol=1e-5)
    assert dice(result["labels"], exported["mask"]) > 0.9
    centroid = [np.argwhere(m).mean(0) for m in (result["labels"] == 1, exported["mask"])]
    assert np.abs(centroid[0] - centroid[1]).max() < 0.5  # voxels


def test_predict_errors_name_the_flag(exported, tmp_path):
    from uda_tf.evaluation.predict import load_predictor, resolve_inputs
    with pytest.raises(ValueError, match="--model="):
        load_predictor(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--input="):
        resolve_inputs([str(tmp_path / "*.nii.gz")])
    bad = manifest_for(tmp_path / "other_size", (2.0, 2.0, 2.0))
    bad = dict(bad, image_shape=[32, 32, 1])
    with pytest.raises(ValueError, match="image_shape"):
        load_predictor(exported["model"], manifest=bad)


def test_predict_cli(exported, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "uda_tf.cli.predict", f"--model={exported['model']}",
           f"--input={os.path.dirname(exported['path'])}/*_0000.nii.gz", f"--output_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-2000:]
    labels = np.asarray(nib.load(str(out / "oblique_case.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels, exported["mask"])
    done = subprocess.run(cmd[:-2] + ["--input=/nonexistent/*.nii.gz", f"--output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--input=/nonexistent/*.nii.gz" in done.stderr


def test_predict_checkpoint_on_a_raw_layout(tmp_path, tiny_prepared):
    """A .weights.h5 checkpoint with its flags.cfg and manifest, inputs from --layout=msd:
    every case (one stored LPS, one anisotropic) comes back on its own grid."""
    import shutil

    from tests.helpers import make_msd
    from uda_tf.models import segmentor_from_flags
    from uda_tf.evaluation.predict import load_predictor, predict_cases, resolve_inputs
    data_dir, manifest = tiny_prepared
    values = {"base_filters": "4", "norm": "instance"}
    run = tmp_path / "checkpoints"
    run.mkdir()
    segmentor_from_flags(values, manifest).save_weights(str(run / "best.weights.h5"))
    (run / "flags.cfg").write_text("--base_filters=4\n--norm=instance\n")
    shutil.copy(os.path.join(data_dir, "manifest.json"), run / "manifest.json")
    raw = make_msd(tmp_path / "raw")
    cases = resolve_inputs(layout="msd", input_dir=str(raw))
    assert len(cases) == 6
    predictor = load_predictor(str(run / "best.weights.h5"), batch_size=5)
    predict_cases(predictor, cases[-2:], str(tmp_path / "out"), say=lambda *_: None)
    for case_id, path in cases[-2:]:
        source, result = nib.load(path), nib.load(str(tmp_path / "out" / f"{case_id}.nii.gz"))
        assert result.shape == source.shape
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-6)
        assert np.asarray(result.dataobj).max() < 3


def test_input_files_of_one_multichannel_scan_are_one_case(tmp_path):
    from uda_tf.evaluation.predict import resolve_inputs
    for k in (1, 0, 2):
        (tmp_path / f"p7_000{k}.nii.gz").write_bytes(b"")
    (tmp_path / "q1_0000.nii.gz").write_bytes(b"")
    cases = dict(resolve_inputs([str(tmp_path / "*.nii.gz")]))
    assert cases["p7"] == tuple(str(tmp_path / f"p7_000{k}.nii.gz") for k in range(3))
    assert cases["q1"] == str(tmp_path / "q1_0000.nii.gz")
    (tmp_path / "q1_0002.nii.gz").write_bytes(b"")  # channel 1 missing: not one scan
    with pytest.raises(ValueError, match="both give case id 'q1'"):
        resolve_inputs([str(tmp_path / "*.nii.gz")])
