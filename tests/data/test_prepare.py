"""prepare: a tiny synthetic MSD dataset -> shards + manifest, checked against the contract."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import LPS_CASE, make_msd
from uda_tf.data import prepare as prepare_mod
from uda_tf.data import io, layouts, manifest as manifest_lib, preprocess, tfrecord

SIZE = (16, 28)  # H crops the 20-voxel x axis, W pads the 24-voxel y axis


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = make_msd(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("out")
    manifest = prepare_mod.prepare(str(raw), str(out), size=SIZE, records_per_shard=8, workers=1,
                                   verbose=False)
    return raw, out, manifest


def _read_case(out, manifest, case_id):
    case = manifest["cases"][case_id]
    files = manifest.shard_files(str(out), case["domain"], case["split"])
    ds = tf.data.TFRecordDataset(files).map(lambda r: tfrecord.parse_slice(r, *SIZE, 1))
    rows = [e for e in ds if e["case_id"].numpy().decode() == case_id]
    assert [int(e["slice_index"]) for e in rows] == list(range(case["num_slices"]))  # in order
    image = np.stack([e["image"].numpy()[..., 0] for e in rows], axis=-1)
    label = np.stack([e["label"].numpy() for e in rows], axis=-1)
    return image, label, rows


def test_manifest_follows_contract(prepared):
    _, out, manifest = prepared
    assert manifest == manifest_lib.load_manifest(str(out))
    assert manifest["format"] == "uda_tf.prepared" and manifest["version"] == 1
    assert manifest["dataset_name"] == "tiny test" and manifest["layout"] == "msd"
    assert manifest["image_shape"] == [16, 28, 1] and manifest["image_dtype"] == "float32"
    assert manifest["num_classes"] == 3
    assert manifest["label_names"] == {"0": "background", "1": "left", "2": "front"}
    assert manifest["preprocessing"] == {
        "orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
        "interpolation": {"image": "linear", "label": "linear_onehot"},
        "clip_percentiles": [1.0, 99.0], "normalization": "minmax", "size": [16, 28],
        "slice_axis": "axial", "foreground": "nonzero", "foreground_percentile": 5.0,
        "normalize_in_foreground": False, "crop_foreground": False, "color": "green"}
    assert manifest["output"] == {"records": "slices", "context_slices": 0,
                                  "image_dtype": "float32", "compression": None}
    assert manifest["split"] == {"fractions": {"train": 0.7, "val": 0.2, "test": 0.1}, "seed": 0,
                                 "file_sha256": None}
    for domain in ("dom_a", "dom_b"):
        entry = manifest["domains"][domain]
        assert entry["labelled"] is True
        # 3 cases and 0.7/0.2/0.1: every split still gets one
        counts = {s: len(ids) for s, ids in entry["cases"].items()}
        assert counts == {"train": 1, "val": 1, "test": 1}
    case = manifest["cases"][LPS_CASE]
    assert case["domain"] == "dom_b" and case["has_label"] is True
    assert case["original_shape"] == [20, 24, 10]
    np.testing.assert_allclose(case["original_spacing"], [1.6, 2.5, 3.0])
    assert case["original_affine"][0][0] == pytest.approx(-1.6)
    assert case["resampled_shape"] == [16, 30, 15] and case["num_slices"] == 15
    assert case["crop_pad"]["pad"] == [[0, 0], [0, 0]]
    assert case["crop_pad"]["crop"] == [[0, 0], [1, 1]]
    assert set(case["intensity"]) == {"p_low", "p_high", "mean", "std"}
    assert manifest["content_hash"] == manifest_lib.content_hash(manifest)
    assert "/" not in json.dumps(manifest["cases"]).replace("shards/", "")  # no file paths


def test_shards_hold_every_slice_once(prepared):
    _, out, manifest = prepared
    total = sum(c["num_slices"] for c in manifest["cases"].values())
    assert sum(s["records"] for s in manifest["shards"]) == total == 5 * 10 + 15
    for s in manifest["shards"]:
        k = int(s["file"][-14:-9])
        assert s["file"] == f"shards/{s['domain']}-{s['split']}-{k:05d}.tfrecord"
        assert sum(1 for _ in tf.data.TFRecordDataset(str(out / s["file"]))) == s["records"]
    assert not [f for f in os.listdir(out / "shards") if f.startswith(".") or ".tmp" in f]


def test_slice_equals_preprocessed_volume(prepared):
    raw, out, manifest = prepared
    case_id = "a_001"
    image, label, rows = _read_case(out, manifest, case_id)
    expected_image, expected_label, record = preprocess.preprocess_volumes(
        io.read_volume(str(raw / "imagesTr" / f"{case_id}_0000.nii.gz")),
        io.read_volume(str(raw / "labelsTr" / f"{case_id}.nii.gz"), is_label=True),
        preprocess.PreprocessConfig(size=SIZE))
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert record["intensity"] == manifest["cases"][case_id]["intensity"]
    assert rows[0]["domain"].numpy() == b"dom_a" and int(rows[0]["num_slices"]) == 10
    np.testing.assert_allclose(rows[0]["spacing"].numpy(), [2, 2, 2])
    assert image.min() >= 0 and image.max() <= 1  # minmax
    # 2 mm in, 2 mm out: labels survive untouched, and restoring gives the file back exactly
    original = np.asarray(nib.load(str(raw / "labelsTr" / f"{case_id}.nii.gz")).dataobj)
    assert set(np.unique(label)) == set(np.unique(original)) == {0, 1, 2}
    restored = preprocess.restore_to_original(
        label, manifest["cases"][case_id], manifest["preprocessing"])
    np.testing.assert_array_equal(restored, original)


def test_lps_anisotropic_case_is_reoriented_and_resampled(prepared):
    raw, out, manifest = prepared
    image, label, _ = _read_case(out, manifest, LPS_CASE)
    assert image.shape == (16, 28, 15)
    # the world ramp increases towards R, A and S: so must every prepared axis (interior)
    inner = image[2:-2, 2:-2, 2:-2]
    for axis in range(3):
        assert (np.diff(inner, axis=axis) > 0).all()
    assert set(np.unique(label)) == {0, 1, 2}
    original = np.asarray(nib.load(str(raw / "labelsTr" / f"{LPS_CASE}.nii.gz")).dataobj)
    restored = preprocess.restore_to_original(
        label, manifest["cases"][LPS_CASE], manifest["preprocessing"])
    assert restored.shape == original.shape
    assert (restored == original).mean() > 0.9  # nearest down/up-sampling blurs only edges


def test_rerun_is_a_no_op_and_other_parameters_need_overwrite(prepared, tmp_path, capsys):
    raw, out, manifest = prepared
    again = prepare_mod.prepare(str(raw), str(out), size=SIZE, records_per_shard=8, workers=1)
    assert again == manifest and "already prepared" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="preprocessing"):
        prepare_mod.prepare(str(raw), str(out), size=SIZE, records_per_shard=8,
                            normalization="zscore", verbose=False)


def test_workers_and_label_forms_give_identical_output(prepared, tmp_path):
    _, _, manifest = prepared
    raw = make_msd(tmp_path / "raw_v1", labels_form="msd_v1")
    other = prepare_mod.prepare(str(raw), str(tmp_path / "out"), size=SIZE, records_per_shard=8,
                                workers=2, verbose=False)
    assert other["content_hash"] == manifest["content_hash"]


def test_overwrite_replaces_and_removes_stale_shards(tmp_path):
    raw = make_msd(tmp_path / "raw")
    out = tmp_path / "out"
    first = prepare_mod.prepare(str(raw), str(out), size=SIZE, records_per_shard=2, workers=1,
                                verbose=False)
    second = prepare_mod.prepare(str(raw), str(out), size=SIZE, records_per_shard=100, workers=1,
                                 normalization="zscore", domains=["dom_b"], overwrite=True,
                                 verbose=False)
    assert len(first["shards"]) > len(second["shards"]) == 3
    assert sorted(os.listdir(out / "shards")) == sorted(s["file"][7:] for s in second["shards"])
    assert set(second["domains"]) == {"dom_b"}
    image, _, _ = _read_case(out, second, "b_000")
    assert abs(image.mean()) < 0.5 and image.min() < 0  # zscore, not [0, 1]


def test_default_domain_and_split_determinism(tmp_path):
    raw = make_msd(tmp_path / "raw")
    meta = json.loads((raw / "dataset.json").read_text())
    del meta["domains"]
    (raw / "dataset.json").write_text(json.dumps(meta))
    listing = layouts.read_layout("msd", str(raw))
    assert {c.domain for c in listing.cases} == {"tiny_test"}  # sanitized dataset name
    listing = layouts.read_layout("msd", str(raw), default_domain="site1")
    assert {c.domain for c in listing.cases} == {"site1"}
    ids = [f"c{i:03d}" for i in range(10)]
    split = prepare_mod.split_cases(ids, (0.7, 0.2, 0.1), 3, "site1")
    assert split == prepare_mod.split_cases(list(reversed(ids)), (0.7, 0.2, 0.1), 3, "site1")
    assert [len(split[s]) for s in ("train", "val", "test")] == [7, 2, 1]
    assert sorted(sum(split.values(), [])) == ids


def test_errors_name_what_is_wrong(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_mod.prepare(str(missing), str(tmp_path / "o1"), verbose=False)
    raw = make_msd(tmp_path / "raw")
    with pytest.raises(ValueError, match="'nope'.*msd"):
        prepare_mod.prepare(str(raw), str(tmp_path / "o2"), layout="nope", verbose=False)
    with pytest.raises(ValueError, match="dom_z.*dom_a, dom_b"):
        prepare_mod.prepare(str(raw), str(tmp_path / "o3"), domains=["dom_z"], verbose=False)
    with pytest.raises(ValueError, match="split"):
        prepare_mod.prepare(str(raw), str(tmp_path / "o3"), split=(0.5, 0.2), verbose=False)
    bad = nib.load(str(raw / "labelsTr" / "a_002.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(bad.shape, 9, np.uint8), bad.affine),
             str(raw / "labelsTr" / "a_002.nii.gz"))
    with pytest.raises(io.NiftiError, match=r"a_002\.nii\.gz has values \[9\] outside"):
        prepare_mod.prepare(str(raw), str(tmp_path / "o4"), workers=1, verbose=False)
    assert not os.path.exists(tmp_path / "o4" / "manifest.json")
    os.remove(raw / "labelsTr" / "a_001.nii.gz")
    with pytest.raises(layouts.LayoutError, match=r"labelsTr/a_001\.nii\.gz"):
        prepare_mod.prepare(str(raw), str(tmp_path / "o4"), verbose=False)
    os.remove(raw / "dataset.json")
    with pytest.raises(layouts.LayoutError, match="dataset.json"):
        layouts.read_layout("msd", str(raw))
    with pytest.raises(FileNotFoundError, match="not a prepared dataset.*uda_tf.cli.prepare"):
        manifest_lib.load_manifest(str(tmp_path / "o4"))


def test_shard_files_names_available_splits(prepared):
    _, out, manifest = prepared
    assert len(manifest.shard_files(str(out), "dom_a", "train")) == 2
    with pytest.raises(ValueError, match=r"'dom_c'.*'train'.*dom_a/test"):
        manifest.shard_files(str(out), "dom_c", "train")


def test_manifest_answers_from_its_json(prepared):
    """The Manifest's properties say what the raw JSON says, and it stays plain JSON."""
    _, out, manifest = prepared
    assert isinstance(manifest, manifest_lib.Manifest)
    raw = json.loads((out / "manifest.json").read_text())
    assert json.loads(json.dumps(manifest)) == raw and manifest.as_dict() == raw
    assert manifest.class_names == [raw["label_names"][str(i)] for i in range(raw["num_classes"])]
    assert manifest.label_names == {int(k): v for k, v in raw["label_names"].items()}
    assert manifest.record_kind == "slices" and manifest.content_hash == raw["content_hash"]
    for domain, entry in raw["domains"].items():
        for split, ids in entry["cases"].items():
            assert manifest.cases(domain, split) == ids
            assert manifest.labelled_cases(domain, split) == [
                c for c in ids if raw["cases"][c].get("has_label", True)]
            assert manifest.num_records(domain, split) == sum(
                s["records"] for s in raw["shards"] if (s["domain"], s["split"]) == (domain, split))
    wrapped = manifest_lib.Manifest.of(raw)  # a dict built by hand
    assert wrapped.num_classes == raw["num_classes"]
    assert manifest_lib.Manifest.of(wrapped) is wrapped


def test_cli_rejects_unknown_flag_and_layout(tmp_path):
    from tests.cli_runner import run_cli
    base = [f"--input_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}"]
    for arg, expected in (("--bogus_flag", "bogus_flag"), ("--layout=nope", "layout")):
        proc = run_cli("uda_tf.cli.prepare", base + [arg])
        assert proc.returncode != 0
        assert expected in proc.stderr and (arg != "--layout=nope" or "msd" in proc.stderr)


def test_read_volume_reorients_and_names_bad_files(tmp_path):
    # on-disk axes run A, S, L (a permutation plus a flip) with anisotropic voxels
    affine = np.array([[0, 0, -3.0, 50], [1.5, 0, 0, -20], [0, 2.0, 0, 5], [0, 0, 0, 1]])
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "asl.nii.gz"))
    volume = io.read_volume(str(tmp_path / "asl.nii.gz"))
    assert volume.array.shape == (6, 4, 5) and volume.spacing == (3.0, 1.5, 2.0)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert io.canonical_geometry(volume.original_shape, volume.original_affine) == (
        volume.array.shape, volume.spacing)
    np.testing.assert_array_equal(io.ras_to_original(volume.array, volume.original_affine), data)
    nib.save(nib.Nifti1Image(data[..., None], affine), str(tmp_path / "x1.nii.gz"))
    assert io.read_volume(str(tmp_path / "x1.nii.gz")).array.shape == (6, 4, 5)

    four_d = nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), affine)
    nib.save(four_d, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(io.NiftiError, match=r"3D volume in .*4d\.nii\.gz"):
        io.read_volume(str(tmp_path / "4d.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(io.NiftiError, match=r"junk\.nii\.gz"):
        io.read_volume(str(tmp_path / "junk.nii.gz"))
    with pytest.raises(FileNotFoundError, match=r"gone\.nii\.gz"):
        io.read_volume(str(tmp_path / "gone.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), 7, np.uint8), affine), str(tmp_path / "lab.nii.gz"))
    case = layouts.CaseRecord("c", "d", str(tmp_path / "asl.nii.gz"), str(tmp_path / "lab.nii.gz"))
    with pytest.raises(io.NiftiError, match=r"lab\.nii\.gz has values \[7\].*0\.\.2.*3 labels"):
        preprocess.prepare_case(case, preprocess.PreprocessConfig(), label_values=3)


def test_label_resampling_keeps_label_and_image_aligned():
    """Downsampling by an even factor: the label mask's centre of mass stays where the
    linearly resampled image puts it (nearest neighbour would shift it by half a voxel)."""
    mask = np.zeros((20, 6, 6), np.uint8)
    mask[3:11] = 2  # boundaries fall on output midpoints at both ends
    image_like = preprocess.resample(mask.astype(np.float32) / 2, (1, 1, 1), (2, 1, 1), order=1)
    labels = preprocess.resample_labels(mask, (1, 1, 1), (2, 1, 1))
    assert labels.shape == (10, 6, 6) and set(np.unique(labels)) == {0, 2}
    x = np.arange(10)
    com_image = (image_like[:, 0, 0] * x).sum() / image_like[:, 0, 0].sum()
    com_label = ((labels[:, 0, 0] == 2) * x).sum() / (labels[:, 0, 0] == 2).sum()
    assert abs(com_image - com_label) < 1e-6
    nearest = preprocess.resample(mask, (1, 1, 1), (2, 1, 1), order=0)
    com_nearest = ((nearest[:, 0, 0] == 2) * x).sum() / (nearest[:, 0, 0] == 2).sum()
    assert abs(com_image - com_nearest) > 0.25  # the shift this function avoids
