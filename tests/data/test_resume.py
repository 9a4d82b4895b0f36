"""An interrupted `prepare` re-run with the same arguments keeps its finished shards, prepares
only the rest, and ends with the same shards and manifest as an uninterrupted run."""
import hashlib
import os

import pytest

from tests.helpers import make_msd
from uda_tf import files
from uda_tf.data import prepare as prepare_mod
from uda_tf.data import sharding


class Interrupted(Exception):
    pass


def _files(out):
    """{relative path: sha256} of everything in the output directory (the ownership marker
    is compared by presence only: it records when the directory was created)."""
    found = {}
    for directory, _, names in os.walk(out):
        for name in names:
            if name == files.MARKER_FILE:
                found[name] = "present"
                continue
            path = os.path.join(directory, name)
            found[os.path.relpath(path, out)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_msd(tmp_path_factory.mktemp("raw"))


CASES = [
    # 2D slices, 4 per shard: shard boundaries fall inside cases (10 or 15 slices each)
    dict(size=(16, 24), records_per_shard=4),
    # 3D volumes, float16, GZIP shards
    dict(size=(16, 24, 8), records_per_shard=1, output="volumes", image_dtype="float16",
         compression="gzip"),
]


@pytest.mark.parametrize("kwargs", CASES, ids=["slices", "volumes_gzip"])
@pytest.mark.parametrize("stop_after", [1, 5])
def test_interrupted_run_resumes_to_identical_output(raw, tmp_path, monkeypatch, kwargs,
                                                     stop_after):
    reference = prepare_mod.prepare(str(raw), str(tmp_path / "ref"), workers=1, verbose=False,
                                    **kwargs)
    out = tmp_path / "out"
    written = []

    def interrupt(shard):
        written.append(shard["file"])
        if len(written) == stop_after:
            raise Interrupted(f"stopped after {shard['file']}")

    monkeypatch.setattr(sharding, "AFTER_SHARD_HOOK", interrupt)
    with pytest.raises(Interrupted):
        prepare_mod.prepare(str(raw), str(out), workers=1, verbose=False, **kwargs)
    monkeypatch.setattr(sharding, "AFTER_SHARD_HOOK", None)
    assert not (out / "manifest.json").exists()  # incomplete until the manifest lands
    assert not [f for f in os.listdir(out / "shards") if files.is_partial(f) or ".tmp-" in f]
    # stale temporary files, as a killed process would leave (and one of an earlier version)
    (out / "shards" / ".dom_b-train-00000.partial-99999.tfrecord").write_bytes(b"partial")
    (out / "shards" / "dom_b-train-00000.tfrecord.tmp-99999").write_bytes(b"partial")

    prepared = []
    original = prepare_mod._prepare_or_error
    monkeypatch.setattr(prepare_mod, "_prepare_or_error",
                        lambda case, **kw: prepared.append(case.case_id) or original(case, **kw))
    resumed = prepare_mod.prepare(str(raw), str(out), workers=1, verbose=False, **kwargs)
    assert resumed == reference
    assert _files(out) == _files(tmp_path / "ref")  # same shard bytes, same manifest
    assert len(reference["shards"]) > stop_after
    if stop_after == 5:  # whole cases lie in the first five shards: not prepared again
        assert len(prepared) < 6


def test_progress_of_other_parameters_is_discarded(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupt(shard):
        raise Interrupted()

    monkeypatch.setattr(sharding, "AFTER_SHARD_HOOK", interrupt)
    with pytest.raises(Interrupted):
        prepare_mod.prepare(str(raw), str(out), size=(16, 24), records_per_shard=4, workers=1,
                            verbose=False)
    monkeypatch.setattr(sharding, "AFTER_SHARD_HOOK", None)
    other = prepare_mod.prepare(str(raw), str(out), size=(16, 24), records_per_shard=4,
                                normalization="zscore", workers=1, verbose=False)
    fresh = prepare_mod.prepare(str(raw), str(tmp_path / "fresh"), size=(16, 24),
                                records_per_shard=4, normalization="zscore", workers=1,
                                verbose=False)
    assert other == fresh
    assert not (out / sharding.PROGRESS_DIR).exists()  # removed once the manifest is written


def test_output_of_the_previous_version_is_recognised(raw, tmp_path, capsys):
    """A manifest without the keys added since (output, layout_options, ...) and with the old
    preprocessing entry reads as prepared with today's defaults, not as other parameters."""
    from uda_tf.data import manifest as manifest_lib
    out = tmp_path / "out"
    current = prepare_mod.prepare(str(raw), str(out), size=(16, 24), records_per_shard=8,
                                  workers=1, verbose=False)
    old = {k: v for k, v in current.items()
           if k not in ("output", "layout_options", "skip_bad_cases", "skipped_cases")}
    old["split"] = {k: v for k, v in current["split"].items() if k != "file_sha256"}
    old["preprocessing"] = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                            "interpolation": {"image": "linear", "label": "nearest"},
                            "clip_percentiles": [1.0, 99.0], "normalization": "minmax",
                            "size": [16, 24]}
    manifest_lib.write_manifest(str(out), old)
    again = prepare_mod.prepare(str(raw), str(out), size=(16, 24), records_per_shard=8,
                                workers=1)
    assert "nothing to do" in capsys.readouterr().out
    assert again["preprocessing"] == old["preprocessing"]  # left as it was


def test_marked_shards_lists_the_shards_of_markers_and_an_earlier_manifest(tmp_path):
    """The shards prepare may remove as its own: those its progress markers (any request)
    and an earlier manifest list under shards/; nothing outside shards/, nothing malformed."""
    progress = tmp_path / sharding.PROGRESS_DIR
    progress.mkdir()
    sharding.write_json_atomic(str(progress / "a-train-00000.json"),
                               {"shard": {"file": "shards/a-train-00000.tfrecord"}})
    sharding.write_json_atomic(str(progress / "a-train.done.json"), {"shards": [
        {"file": "shards/a-train-00001.tfrecord"}, {"file": "elsewhere/x.tfrecord"}, "bad"]})
    (progress / "torn.json").write_text("{")
    manifest = {"shards": [{"file": "shards/b-val-00000.tfrecord"}, {"file": 3},
                           {"file": "shards/../escape.tfrecord"}]}
    marked = {"a-train-00000.tfrecord", "a-train-00001.tfrecord"}
    assert sharding.marked_shards(str(tmp_path)) == marked
    assert sharding.marked_shards(str(tmp_path), manifest) == marked | {"b-val-00000.tfrecord"}
    assert sharding.marked_shards(str(tmp_path), ["not", "a", "manifest"]) == marked
    assert sharding.marked_shards(str(tmp_path / "absent"), manifest) == {"b-val-00000.tfrecord"}
