"""Hardening of the data side (issue "Real data, every path end to end, and no way to lose a
user's files"): every public layout prepares, bad dataset.json / split files / headers /
manifests give errors naming the file and the key, a forged header cannot exhaust memory, no
NaN reaches a shard, one prepare writes an output at a time, and prepare removes only files it
wrote. Tiny volumes (10x12x6), workers=1 unless the test is about workers; one CLI subprocess.
"""
import gzip
import json
import logging
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest

from tests.data import raw_layouts as raw
from uda_tf import files
from uda_tf.data import prepare as prepare_mod
from uda_tf.data import io, layouts, preprocess, sharding
from uda_tf.data import manifest as manifest_lib
from uda_tf.data.integrity import verify_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(size=(8, 8), workers=1, verbose=False)


def _prepare(input_dir, output_dir, **kwargs):
    return prepare_mod.prepare(str(input_dir), str(output_dir), **{**SMALL, **kwargs})


# --- 1. every public layout prepares --------------------------------------------------------

def test_cc359_and_stare_prepare_end_to_end(tmp_path):
    """Both used to stop with KeyError: None in input_fingerprint (binarized labels, no mask)."""
    raw.make_cc359(tmp_path / "cc359")
    manifest = _prepare(tmp_path / "cc359", tmp_path / "cc_out", layout="cc359",
                        keep_identifiers=True)
    assert sorted(manifest["domains"]) == ["ge_15", "ge_3", "philips_15", "siemens_3"]
    assert len(manifest["cases"]) == 5
    raw.make_stare(tmp_path / "stare")
    manifest = _prepare(tmp_path / "stare", tmp_path / "stare_out", layout="stare",
                        spacing=(1, 1, 1), keep_identifiers=True)
    assert sorted(manifest["cases"]) == ["im0001", "im0002", "im0003"]
    for out in ("cc_out", "stare_out"):
        loaded = manifest_lib.load_manifest(str(tmp_path / out))
        assert verify_shards(loaded, str(tmp_path / out)) == len(loaded["shards"])


# --- 2. no NaN or infinity reaches a shard --------------------------------------------------

def _case(tmp_path, image, name="big"):
    path = str(tmp_path / f"{name}_0000.nii.gz")
    raw.save_nifti(path, image)
    return layouts.CaseRecord(name, "d", path, None)


def test_intensities_near_the_float32_limit_prepare_to_finite_values(tmp_path):
    image, _ = raw.volume(0)
    image = np.where(image > 30, 3.0e38, -3.0e38).astype(np.float32)  # finite float32
    config = preprocess.PreprocessConfig(size=(8, 8), clip_percentiles=(0.0, 100.0))
    for normalization in ("minmax", "zscore"):
        config = preprocess.PreprocessConfig(size=(8, 8), clip_percentiles=(0.0, 100.0),
                                             normalization=normalization)
        prepared = preprocess.prepare_case(_case(tmp_path, image), config, 3)
        assert np.isfinite(prepared.image).all(), normalization
        assert all(np.isfinite(v) for v in prepared.record["intensity"].values())
        assert prepared.image.max() - prepared.image.min() > 0.5  # still two intensities


def test_non_finite_preprocessing_output_is_an_error_naming_the_case(tmp_path, monkeypatch):
    """The guarantee, whatever step overflowed: here resampling is made to return NaN."""
    image, _ = raw.volume(1)
    case = _case(tmp_path, image, name="c_007")
    monkeypatch.setattr(preprocess, "resample",
                        lambda array, *a, **k: np.full(array.shape, np.nan, np.float32))
    with pytest.raises(io.NiftiError, match=r"case 'c_007' \(.*c_007_0000\.nii\.gz\): "
                                            r"preprocessing produced \d+ NaN or infinite"):
        preprocess.prepare_case(case, preprocess.PreprocessConfig(size=(8, 8)), 3)


# --- 3.-5. dataset.json ---------------------------------------------------------------------

def _msd_v1(root, training=None, test=None, domains=None):
    """MSD v1 dataset.json listing imagesTr/<sub>/<name> pairs; files are written for every
    string path given."""
    for entry in (training or []):
        for key in ("image", "label"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str) \
                    and not os.path.isabs(entry[key]) and ".." not in entry[key]:
                image, label = raw.volume(0)
                raw.save_nifti(os.path.join(root, entry[key]), image if key == "image" else label)
    meta = {"name": "v1", "labels": {"0": "background", "1": "a", "2": "b"},
            "modality": {"0": "CT"}, "training": training or []}
    if test is not None:
        meta["test"] = test
    if domains is not None:
        meta["domains"] = domains
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


def test_msd_v1_entries_sharing_a_file_name_are_an_error_naming_both(tmp_path):
    root = _msd_v1(tmp_path / "r", training=[
        {"image": "./imagesTr/a/case.nii.gz", "label": "./labelsTr/a/case.nii.gz"},
        {"image": "./imagesTr/b/case.nii.gz", "label": "./labelsTr/b/case.nii.gz"}])
    with pytest.raises(layouts.LayoutError) as error:
        layouts.read_layout("msd", root)
    message = str(error.value)
    assert "dataset.json" in message and "case id 'case'" in message
    assert "'training'[0] './imagesTr/a/case.nii.gz'" in message
    assert "'training'[1] './imagesTr/b/case.nii.gz'" in message
    root = _msd_v1(tmp_path / "t", training=[
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
        test=["./imagesTs/a/t.nii.gz", "./imagesTs/b/t.nii.gz"])
    with pytest.raises(layouts.LayoutError, match=r"'test'\[0\] './imagesTs/a/t.nii.gz'.* and "
                                                  r"'test'\[1\] './imagesTs/b/t.nii.gz'"):
        layouts.read_layout("msd", root)


@pytest.mark.parametrize("training,test,expected", [
    (["./imagesTr/x.nii.gz"], None, r"'training'\[0\]: expected an object with 'image' and"),
    ([{"image": 3, "label": "./labelsTr/x.nii.gz"}], None,
     r"'training'\[0\] 'image': expected a non-empty relative path string, got 3"),
    ([{"image": "/etc/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], None,
     r"'training'\[0\] 'image': '/etc/x.nii.gz' must be a path relative to the dataset root"),
    ([{"image": "./imagesTr/x.nii.gz", "label": "../../labels/x.nii.gz"}], None,
     r"'training'\[0\] 'label': '../../labels/x.nii.gz' must be .* stays inside it"),
    ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
     ["./imagesTs/y.nii.gz", 7], r"'test'\[1\]: expected a non-empty relative path string"),
    ({"image": "./imagesTr/x.nii.gz"}, None, r"'training' must be a list"),
])
def test_malformed_msd_v1_entries_name_the_entry(tmp_path, training, test, expected):
    root = _msd_v1(tmp_path / "r", training=training, test=test)
    with pytest.raises(layouts.LayoutError, match=expected) as error:
        layouts.read_layout("msd", root)
    assert f"{root}/dataset.json" in str(error.value)


@pytest.mark.parametrize("domains,expected", [
    ({"a": [["c_000"]]}, r"'domains'\['a'\] holds \['c_000'\]; expected case id strings"),
    ({"a": ["c_000", 5]}, r"'domains'\['a'\] holds 5"),
    ({"a": "c_000"}, r"'domains'\['a'\] must be a list of case ids"),
    (["c_000"], r"'domains' must map domain names to lists of case ids, got list"),
])
def test_malformed_domains_name_the_key(tmp_path, domains, expected):
    raw.make_msd_with_tests(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "dataset.json").read_text())
    (tmp_path / "r" / "dataset.json").write_text(json.dumps({**meta, "domains": domains}))
    with pytest.raises(layouts.LayoutError, match=expected):
        layouts.read_layout("msd", str(tmp_path / "r"))


# --- 6. split file --------------------------------------------------------------------------

def test_split_file_ids_matching_no_case_are_an_error(tmp_path):
    raw.make_msd_with_tests(tmp_path / "raw")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"c_000": "train", "c_001": "val", "c_002": "test",
                                      "t_000": "unlabelled", "t_001": "unlabelled",
                                      "case_9": "train", "zz": "test"}))
    with pytest.raises(ValueError, match=r"split.json names cases \['case_9', 'zz'\] \(2 of 7\) "
                                         r"that are not in .*raw .*a split file must describe "
                                         r"this dataset's cases"):
        _prepare(tmp_path / "raw", tmp_path / "out", split_file=str(split_file))
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --- 7. header inconsistencies --------------------------------------------------------------

def _nifti(path, header_edit=None, affine=np.diag([1.5, 1.5, 2.0, 1.0])):
    image, _ = raw.volume(0)
    img = nib.Nifti1Image(image, affine)
    if header_edit:
        header_edit(img.header)
    nib.save(img, path)
    return path


@pytest.mark.parametrize("value", [0.0, -0.0, float("nan"), 1e9])
def test_unusable_voxel_size_is_an_error_naming_the_file(tmp_path, value):
    """pixdim[2] as stored (nibabel would quietly turn 0 and -0 into 1 mm), in a file whose
    affine comes from pixdim (no sform, no qform)."""
    path = str(tmp_path / "scan.nii")
    header = nib.Nifti1Header()
    header.set_data_shape((10, 12, 6))
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(np.ones((10, 12, 6), np.float32), None, header), path)
    data = bytearray(open(path, "rb").read())
    data[84:88] = struct.pack("<f", value)  # pixdim[2]
    open(path, "wb").write(bytes(data))
    with pytest.raises(io.NiftiError, match=r"scan\.nii: voxel size .* is not usable"):
        io.read_volume(path)


def test_zero_column_in_the_sform_is_an_error_naming_the_file(tmp_path):
    path = _nifti(str(tmp_path / "flat.nii"))
    assert nib.load(path).header["sform_code"] > 0
    data = bytearray(open(path, "rb").read())
    data[300:304] = struct.pack("<f", 0.0)  # srow_y[1]: the second column becomes zero
    open(path, "wb").write(bytes(data))
    with pytest.raises(io.NiftiError, match=r"flat\.nii: voxel size \(1.5, 0.0, 2.0\) mm"):
        io.read_volume(path)


@pytest.fixture
def absl_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="absl")
    return caplog


def test_qform_sform_disagreement_is_a_warning_naming_the_file(tmp_path, absl_warnings):
    def edit(header):
        header.set_sform(np.diag([1.5, 1.5, 2.0, 1.0]), code=1)
        header.set_qform(np.diag([3.0, 1.5, 2.0, 1.0]), code=1)

    path = _nifti(str(tmp_path / "forms.nii.gz"), edit)
    volume = io.read_volume(path)
    assert volume.spacing == pytest.approx((1.5, 1.5, 2.0))  # the sform is used
    [message] = [r.getMessage() for r in absl_warnings.records if "qform" in r.getMessage()]
    assert path in message and "uses the sform" in message
    absl_warnings.clear()

    def agree(header):
        header.set_sform(np.diag([1.5, 1.5, 2.0, 1.0]), code=1)
        header.set_qform(np.diag([1.5, 1.5, 2.0, 1.0]), code=1)

    path = _nifti(str(tmp_path / "agree.nii.gz"), agree)
    assert nib.load(path).header["qform_code"] == 1  # both set, equal up to float32
    io.read_volume(path)
    assert not absl_warnings.records


def test_sheared_affine_is_a_warning_naming_the_file(tmp_path, absl_warnings):
    sheared = np.diag([1.5, 1.5, 2.0, 1.0])
    sheared[0, 1] = 0.5  # the second voxel axis leans into the first
    path = _nifti(str(tmp_path / "shear.nii.gz"), affine=sheared)
    io.read_volume(path)
    [message] = [r.getMessage() for r in absl_warnings.records if "sheared" in r.getMessage()]
    assert path in message and "degrees from perpendicular" in message
    absl_warnings.clear()
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    io.read_volume(_nifti(str(tmp_path / "oblique.nii.gz"),
                          affine=rotation @ np.diag([1.5, 1.5, 2.0, 1.0])))
    assert not absl_warnings.records  # an oblique (rotated) scan is normal


# --- 8. memory bombs ------------------------------------------------------------------------

def _header_only(path, shape, dtype=np.float32, gz=False):
    """A NIfTI header declaring `shape` with (almost) no voxel data behind it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    data = header.binaryblock + b"\0" * 4 + b"\0" * 16
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if gz else data)
    return path


def _bounded(fn, limit_mb=8):
    """The exception fn raises, checking it allocated under `limit_mb` and was quick."""
    tracemalloc.start()
    start = time.time()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned for the caller's checks
        error = e
    else:
        error = None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert time.time() - start < 10
    return error


def test_header_declaring_too_many_voxels_is_refused_before_reading(tmp_path):
    path = _header_only(str(tmp_path / "bomb.nii.gz"), (1000, 1000, 500), gz=True)
    error = _bounded(lambda: io.read_volume(path))
    assert isinstance(error, io.NiftiError), error
    assert "bomb.nii.gz" in str(error) and "500000000 voxels" in str(error)
    assert "--max_voxels" in str(error)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_is_refused_before_allocating_its_declared_size(tmp_path, gz):
    """400x400x300 uint8 (48 MB) is under the voxel limit; the file holds none of it."""
    path = _header_only(str(tmp_path / ("short.nii.gz" if gz else "short.nii")), (400, 400, 300),
                        dtype=np.uint8, gz=gz)
    error = _bounded(lambda: io.read_volume(path))
    assert isinstance(error, io.NiftiError), error
    assert "short.nii" in str(error) and "truncated" in str(error)
    assert "declares shape (400, 400, 300)" in str(error)


def test_gzip_that_inflates_beyond_max_voxels_is_refused(tmp_path):
    path = str(tmp_path / "inflates.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), path)
    assert os.path.getsize(path) < 2**16  # compresses ~1000-fold
    error = _bounded(lambda: io.read_volume(path, max_voxels=10_000), limit_mb=2)
    assert isinstance(error, io.NiftiError) and "max_voxels=10000" in str(error)


def test_multi_member_gzip_still_reads(tmp_path):
    """A file whose trailer does not give the whole size (two gzip members, as bgzip
    writes) is counted instead: no false 'truncated'."""
    image, _ = raw.volume(2)
    data = nib.Nifti1Image(image, raw.AFFINE).to_bytes()
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(data[:500], mtime=0) + gzip.compress(data[500:], mtime=0))
    np.testing.assert_array_equal(io.read_volume(str(path)).array, image)


def _png_header(path, width, height):
    """A PNG whose IHDR declares width x height, with one empty IDAT: Pillow would
    allocate the declared size when decoding."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_picture_declaring_too_many_pixels_is_refused(tmp_path):
    path = _png_header(str(tmp_path / "huge.png"), 12000, 12000)  # over 2**27, Pillow warns
    error = _bounded(lambda: io.read_volume(path))
    assert isinstance(error, io.NiftiError) and "huge.png" in str(error)
    assert "12000x12000" in str(error) and "--max_voxels" in str(error)
    path = _png_header(str(tmp_path / "bomb.png"), 20000, 20000)  # Pillow itself refuses
    error = _bounded(lambda: io.read_volume(path, max_voxels=10**9))
    assert isinstance(error, io.NiftiError) and "bomb.png" in str(error)
    assert "decompression-bomb limit" in str(error) and "400000000 pixels" in str(error)


def test_max_voxels_reaches_the_worker_processes(tmp_path):
    raw.make_msd_with_tests(tmp_path / "raw")
    with pytest.raises(io.NiftiError, match=r"720 voxels, more than the limit max_voxels=100 "
                                            r"\(prepare's --max_voxels raises it"):
        _prepare(tmp_path / "raw", tmp_path / "out", workers=2, max_voxels=100)


# --- 9. manifest.json -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    raw.make_msd_with_tests(root / "raw")
    _prepare(root / "raw", root / "out", records_per_shard=4)
    return root / "out"


def _edited(prepared, tmp_path, edit, restamp=True):
    """A copy of the prepared manifest with `edit` applied (and its content hash renewed, as a
    careful hand edit or a bug would leave it)."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    edit(manifest)
    if restamp:
        manifest["content_hash"] = manifest_lib.content_hash(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def test_edited_manifest_says_what_to_do(prepared, tmp_path):
    directory = _edited(prepared, tmp_path, lambda m: m.update(dataset_name="renamed"),
                        restamp=False)
    with pytest.raises(manifest_lib.ManifestError,
                       match=r"manifest.json was modified after it was written .* Prepare the "
                             r"data again"):
        manifest_lib.load_manifest(directory)


def _first_split(manifest):
    domain = next(iter(manifest["domains"].values()))
    return domain["cases"][next(iter(domain["cases"]))]


@pytest.mark.parametrize("edit,key", [
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), r"'shards'\[0\] 'file'"),
    (lambda m: m["shards"][0].update(file="/tmp/x.tfrecord"), r"'shards'\[0\] 'file'"),
    (lambda m: m["shards"][1].pop("sha256"), r"'shards'\[1\] 'sha256'"),
    (lambda m: m["shards"][0].update(records="4"), r"'shards'\[0\] 'records'"),
    (lambda m: m["shards"][0].update(domain="elsewhere"), r"'shards'\[0\] 'domain'"),
    (lambda m: _first_split(m).append("ghost"), r"'domains'\[.*\] 'cases'\[.*\].*'ghost'"),
    (lambda m: m.pop("num_classes"), r"key 'num_classes' must be present"),
    (lambda m: m.update(label_names=["background"]), r"'label_names'"),
    (lambda m: m.pop("shards"), r"keys \['shards'\] must be present"),
    (lambda m: m.update(cases=[]), r"'cases' must be an object"),
    (lambda m: m["preprocessing"].update(spacing="2"), r"'preprocessing'"),
    (lambda m: m.update(image_shape=[8, "8", 1]), r"'image_shape'"),
])
def test_manifest_structure_errors_name_the_file_and_key(prepared, tmp_path, edit, key):
    directory = _edited(prepared, tmp_path, edit)
    with pytest.raises(manifest_lib.ManifestError, match=key) as error:
        manifest_lib.load_manifest(directory)
    assert os.path.join(directory, "manifest.json") in str(error.value)


def test_unparsable_manifest_is_a_manifest_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "uda_tf.prepared", "version": 1,')
    with pytest.raises(manifest_lib.ManifestError, match=r"cannot read .*manifest.json"):
        manifest_lib.load_manifest(str(tmp_path))


# --- 10. one writer, and removal only of what prepare wrote ---------------------------------

def test_second_prepare_into_the_same_directory_is_refused(tmp_path, monkeypatch):
    raw.make_msd_with_tests(tmp_path / "raw")
    out = tmp_path / "out"
    second = {}

    def start_second(_shard):
        if second:
            return
        second["proc"] = subprocess.run(
            [sys.executable, "-m", "uda_tf.cli.prepare", f"--input_dir={tmp_path / 'raw'}",
             f"--output_dir={out}", "--size=8,8", "--workers=1", "--noprogress",
             "--records_per_shard=2"],
            capture_output=True, text=True, cwd=REPO, timeout=180,
            env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"))

    monkeypatch.setattr(sharding, "AFTER_SHARD_HOOK", start_second)
    manifest = _prepare(tmp_path / "raw", out, records_per_shard=1)
    proc = second["proc"]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "prepare: error: prepare --output_dir:" in proc.stderr
    assert f"is being written by pid {os.getpid()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert manifest_lib.load_manifest(str(out)) == manifest  # the first finished intact
    assert verify_shards(manifest, str(out)) == len(manifest["shards"]) == 30  # 5 cases x 6
    listed = {os.path.basename(s["file"]) for s in manifest["shards"]}
    assert set(os.listdir(out / "shards")) == listed
    assert files.created_by_us(str(out)) and not (out / files.LOCK_FILE).exists()


def test_prepare_removes_only_the_shards_it_wrote(tmp_path):
    raw.make_msd_with_tests(tmp_path / "raw")
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    theirs = {"shards/notes.tfrecord": b"a user's own records",
              "shards/old.tfrecord.tmp-backup": b"keep", "shards/x.tfrecord.gz": b"gz",
              ".progress/my-notes.txt": b"another tool's progress"}
    (out / ".progress").mkdir()
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    first = _prepare(tmp_path / "raw", out, records_per_shard=2)
    assert not files.created_by_us(str(out))  # the user's directory, not ours
    second = _prepare(tmp_path / "raw", out, records_per_shard=4, overwrite=True)
    written = {os.path.basename(s["file"]) for s in first["shards"] + second["shards"]}
    left = set(os.listdir(out / "shards"))
    their_shards = {os.path.basename(n) for n in theirs if n.startswith("shards/")}
    assert left - their_shards == {
        os.path.basename(s["file"]) for s in second["shards"]}  # the stale ones went
    assert written - left  # (there were stale ones)
    for name, data in theirs.items():  # none of theirs removed or changed
        assert (out / name).read_bytes() == data
    assert os.listdir(out / ".progress") == ["my-notes.txt"]  # our markers went


def test_a_manifest_json_that_is_not_ours_is_never_replaced(tmp_path):
    raw.make_msd_with_tests(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"project": "my notes"}')
    with pytest.raises(FileExistsError, match=r"manifest.json exists but is not a uda_tf "
                                              r"manifest; prepare will not replace it"):
        _prepare(tmp_path / "raw", out, overwrite=True)
    assert (out / "manifest.json").read_text() == '{"project": "my notes"}'


# --- 12. the CLI turns every known condition into `prepare: error:` -------------------------

@pytest.mark.parametrize("problem", ["domains", "split_file", "manifest"])
def test_cli_main_reports_known_conditions_without_a_traceback(tmp_path, monkeypatch, capsys,
                                                                problem):
    from uda_tf.cli import prepare_flags
    raw.make_msd_with_tests(tmp_path / "raw")
    kwargs = dict(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "out"),
                  size=(8, 8), workers=1, verbose=False)
    if problem == "domains":
        meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
        meta["domains"] = {"a": [["c_000"]]}
        (tmp_path / "raw" / "dataset.json").write_text(json.dumps(meta))
    elif problem == "split_file":
        (tmp_path / "split.json").write_text(json.dumps(
            {"c_000": "train", "c_001": "val", "c_002": "test", "t_000": "unlabelled",
             "t_001": "unlabelled", "nobody": "train"}))
        kwargs["split_file"] = str(tmp_path / "split.json")
    else:  # an existing output with a damaged manifest of ours
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "manifest.json").write_text(json.dumps(
            {"format": manifest_lib.FORMAT, "version": 1, "preprocessing": []}))
    monkeypatch.setattr(prepare_flags, "prepare_kwargs", lambda: kwargs)
    with pytest.raises(SystemExit) as exit_info:
        from uda_tf.cli import prepare as prepare_cli
        prepare_cli.main(["prepare"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("prepare: error: ") and len(err.splitlines()) == 1, err
