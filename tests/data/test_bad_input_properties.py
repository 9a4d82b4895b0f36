"""Property-based bad input: corrupted NIfTI headers and voxels, truncated gzip, shards with
bad checksums, wrong dtypes, malformed flagfiles and out-of-range flag values. Each gives its
own error naming the file or flag, within a deadline (nothing hangs), and leaves nothing
half-written behind."""
import gzip
import io as _io
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uda_tf.data import io
from uda_tf.data.integrity import ShardCorruptedError, check_records, verify_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = settings(max_examples=20, deadline=5000,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
HEADER = 348  # bytes of a NIfTI-1 header


def _nifti_bytes(array=None, dtype=np.float32, gz=False) -> bytes:
    array = np.arange(4 * 5 * 3, dtype=dtype).reshape(4, 5, 3) if array is None else array
    img = nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0]), dtype=array.dtype)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def _read(data: bytes, suffix=".nii"):
    """read_volume on `data`; returns the Volume or the NiftiError, any other exception
    fails the property."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"scan{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        try:
            return path, io.read_volume(path)
        except io.NiftiError as e:
            assert path in str(e), str(e)  # the message names the file
            return path, e


@FAST
@given(st.lists(st.tuples(st.integers(0, HEADER - 1), st.integers(0, 255)), min_size=1,
                max_size=8))
def test_corrupted_header_is_read_or_named(edits):
    data = bytearray(_nifti_bytes())
    for position, value in edits:
        data[position] = value
    _, out = _read(bytes(data))
    if not isinstance(out, Exception):
        assert out.array.ndim == 3 and np.isfinite(out.array).all()


@FAST
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4 * 5 * 3 * 4 - 1))
def test_corrupted_voxels_are_read_or_named(noise, offset):
    data = bytearray(_nifti_bytes())
    start = HEADER + 4 + offset
    data[start:start + len(noise)] = noise[:len(data) - start]
    _, out = _read(bytes(data))
    if isinstance(out, Exception):  # a NaN or infinity among the bytes: said so
        assert "NaN or infinite" in str(out) or "cannot read" in str(out)
    else:
        assert np.isfinite(out.array).all()


@FAST
@given(st.floats(0.0, 0.999))
def test_truncated_gzip_is_named(fraction):
    data = _nifti_bytes(gz=True)
    _, out = _read(data[:int(len(data) * fraction)], suffix=".nii.gz")
    assert isinstance(out, io.NiftiError)
    assert "cannot read" in str(out)


@FAST
@given(st.sampled_from([np.int8, np.uint8, np.int16, np.uint16, np.int32, np.float64,
                        np.complex64, np.int64]), st.booleans())
def test_wrong_dtypes_are_read_or_named(dtype, as_label):
    values = (np.arange(60) % 3).reshape(4, 5, 3)
    if np.issubdtype(dtype, np.complexfloating):
        values = values + 1j
    data = _nifti_bytes(values.astype(dtype))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "scan.nii")
        open(path, "wb").write(data)
        try:
            volume = io.read_volume(path, is_label=as_label)
        except io.NiftiError as e:
            assert path in str(e) and "expected real-valued scalar voxels" in str(e)
            assert np.issubdtype(dtype, np.complexfloating), str(e)  # only complex fails
        else:
            assert not np.issubdtype(dtype, np.complexfloating)  # not silently made real
            assert volume.array.dtype == (np.uint8 if as_label else np.float32)


def _shard(directory, records=6):
    from uda_tf.data.tfrecord import serialize_slice, write_shards
    slices = [serialize_slice(np.full((4, 4, 1), i, np.float32), None, "c", "d", i, records,
                              (1, 1, 1)) for i in range(records)]
    [entry] = write_shards(slices, directory, "d-train", records)
    return os.path.join(directory, entry["file"]), entry


@FAST
@given(st.data())
def test_shard_with_a_bad_checksum_is_named(data):
    with tempfile.TemporaryDirectory() as d:
        path, entry = _shard(d)
        raw = bytearray(open(path, "rb").read())
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] ^= data.draw(st.integers(1, 255))
        open(path, "wb").write(bytes(raw))
        manifest = {"shards": [{**entry, "domain": "d", "split": "train"}]}
        with pytest.raises(ShardCorruptedError, match=r"shard .*d-train-00000\.tfrecord is "
                                                      r"corrupted .* re-run prepare"):
            verify_shards(manifest, d)
        with pytest.raises(ShardCorruptedError, match=r"d-train-00000\.tfrecord"):
            check_records(path, expected=entry["records"])
        assert os.listdir(d) == [os.path.basename(path)]  # nothing partial beside it


def test_truncated_shard_names_record_count(tmp_path):
    path, entry = _shard(str(tmp_path))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(ShardCorruptedError,
                       match=r"after \d records|holds 3 records, the manifest says 6"):
        check_records(path, expected=entry["records"])


# Flag parsing runs in one subprocess (train.py's flags go into absl's global FlagValues,
# which other entry points of this test session also use), with hypothesis inside it.
_FLAG_PROPERTIES = textwrap.dedent('''
    import os, sys, tempfile
    from absl import flags
    from hypothesis import given, settings, strategies as st
    from uda_tf.cli import train
    train.define_flags()
    FLAGS = flags.FLAGS
    BOUNDED = {n: FLAGS[n].parser.lower_bound for n in train._NAMES
               if isinstance(getattr(FLAGS[n].parser, "lower_bound", None), int)}
    assert {"epochs", "steps_per_epoch", "backup_every_steps"} <= set(BOUNDED), BOUNDED
    ENUMS = [n for n in train._NAMES if getattr(FLAGS[n].parser, "enum_values", None)]
    assert {"method", "on_divergence"} <= set(ENUMS), ENUMS
    line = st.one_of(
        st.text(max_size=30), st.just("--flagfile=SELF"), st.just("--epochs"),
        st.builds(lambda n, v: f"--{n}={v}", st.sampled_from(train._NAMES), st.text(max_size=8)),
        st.builds(lambda n: f"--{n}", st.text(max_size=10)))

    def parse(argv):
        try:
            FLAGS(argv)
            return None
        except flags.Error as e:
            return str(e)
        finally:
            FLAGS.unparse_flags()

    @settings(max_examples=20, deadline=2000)
    @given(st.lists(line, max_size=6))
    def malformed_flagfile(lines):
        fd, path = tempfile.mkstemp(suffix=".cfg")
        with os.fdopen(fd, "w") as f:
            f.write("\\n".join(l.replace("SELF", path) for l in lines
                               if "\\x00" not in l))
        error = parse(["train", f"--flagfile={path}"])
        os.remove(path)
        if error is not None:
            assert error.strip(), "an empty error message"

    @settings(max_examples=20, deadline=2000)
    @given(st.sampled_from(sorted(BOUNDED)), st.integers(-10**6, -1))
    def below_bound(name, below):
        value = BOUNDED[name] + below
        error = parse(["train", f"--{name}={value}"])
        assert error is not None and name in error and str(value) in error, (name, error)

    @settings(max_examples=20, deadline=2000)
    @given(st.sampled_from(ENUMS), st.text(alphabet="abcxyz_", min_size=1, max_size=8))
    def bad_enum(name, value):
        if value in FLAGS[name].parser.enum_values:
            return
        error = parse(["train", f"--{name}={value}"])
        assert error is not None and name in error, (name, error)

    malformed_flagfile()
    below_bound()
    bad_enum()
    print("FLAG PROPERTIES OK")
''')


def test_malformed_flagfiles_and_out_of_range_values_are_named():
    proc = subprocess.run([sys.executable, "-c", _FLAG_PROPERTIES], capture_output=True,
                          text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0 and "FLAG PROPERTIES OK" in proc.stdout, proc.stderr[-3000:]


# --- dataset.json and manifest.json: any JSON gives a result or the named error --------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=16)
PATHS = st.sampled_from(["./imagesTr/c_000.nii.gz", "./labelsTr/c_000.nii.gz", "imagesTr/a/c.nii",
                         "../outside.nii.gz", "/etc/passwd", "", ".", "./imagesTs/t_000.nii.gz",
                         "imagesTr/c_000_0000.nii.gz"])
DATASET_JSON = st.one_of(
    JSON,
    st.fixed_dictionaries({
        "labels": st.one_of(st.just({"background": 0, "organ": 1}),
                            st.just({"0": "background", "1": "organ"}), JSON),
        "training": st.one_of(st.lists(st.one_of(
            st.fixed_dictionaries({"image": st.one_of(PATHS, JSON),
                                   "label": st.one_of(PATHS, JSON)}), JSON), max_size=3), JSON),
        "test": st.one_of(st.lists(st.one_of(PATHS, JSON), max_size=3), JSON),
        "domains": st.one_of(st.none(), st.dictionaries(
            st.sampled_from(["a", "b", "bad name"]),
            st.one_of(st.lists(st.one_of(st.sampled_from(["c_000", "c", "t_000"]), JSON),
                               max_size=3), JSON), max_size=2)),
        "file_ending": st.one_of(st.just(".nii.gz"), JSON),
        "channel_names": st.one_of(st.just({"0": "CT"}), JSON),
        "numTraining": JSON, "name": JSON}))


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    """imagesTr/, labelsTr/ and imagesTs/ with (empty) files the paths above may name: layout
    reading looks at names only."""
    root = tmp_path_factory.mktemp("dataset_json")
    for name in ("imagesTr/c_000_0000.nii.gz", "labelsTr/c_000.nii.gz", "imagesTr/a/c.nii",
                 "imagesTs/t_000.nii.gz", "imagesTs/t_000_0000.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


@settings(max_examples=50, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(DATASET_JSON)
def test_any_dataset_json_gives_a_listing_or_a_layout_error(msd_root, meta):
    from uda_tf.data import layouts
    (msd_root / "dataset.json").write_text(json.dumps(meta))
    try:
        listing = layouts.read_layout("msd", str(msd_root), skip_bad_cases=True)
    except layouts.LayoutError as e:
        assert str(e).strip()
    else:
        root = os.path.realpath(msd_root)
        for case in listing.cases:  # nothing listed outside the dataset
            assert os.path.realpath(case.image_path).startswith(root + os.sep), case


@pytest.fixture(scope="module")
def prepared_manifest(tmp_path_factory):
    from tests.data import raw_layouts as raw
    from uda_tf.data import prepare as prepare_mod
    root = tmp_path_factory.mktemp("manifest_json")
    raw.make_msd_with_tests(root / "raw")
    prepare_mod.prepare(str(root / "raw"), str(root / "out"), size=(8, 8), workers=1,
                        records_per_shard=4, verbose=False)
    return json.loads((root / "out" / "manifest.json").read_text())


def _locations(value, prefix=()):
    """Every key path inside a JSON value."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _locations(inner, prefix + (key,))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _locations(inner, prefix + (index,))
    return found


@settings(max_examples=50, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_any_manifest_json_loads_or_gives_a_manifest_error(prepared_manifest, tmp_path, data):
    """Arbitrary JSON, or the real manifest with one value replaced or removed and its
    content hash renewed (so the structure checks, not the hash, must catch it)."""
    import copy

    from uda_tf.data import manifest as manifest_lib
    if data.draw(st.booleans()):
        manifest = data.draw(JSON | st.floats())
    else:
        manifest = copy.deepcopy(prepared_manifest)
        location = data.draw(st.sampled_from(_locations(manifest)[1:]))
        parent = manifest
        for key in location[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            del parent[location[-1]]
        else:
            parent[location[-1]] = data.draw(JSON)
        try:
            manifest["content_hash"] = manifest_lib.content_hash(manifest)
        except (ValueError, TypeError, KeyError):
            pass
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    try:
        loaded = manifest_lib.load_manifest(str(tmp_path))
    except manifest_lib.ManifestError as e:
        assert str(tmp_path / "manifest.json") in str(e)
    else:
        for shard in loaded.get("shards", []):
            normal = os.path.normpath(shard["file"])
            assert not os.path.isabs(normal) and not normal.startswith(".."), shard
