"""A patient name in a NIfTI `descrip` and in a case file name leaves no trace in the shards,
the manifest, the MLflow run or the exported model, unless identifiers are kept."""
import json
import os

import nibabel as nib
import pytest

from tests.helpers import make_msd, tiny_segmentor
from uda_tf.data.prepare import prepare

NAME = "DOE_JOHN"
HEADER_TEXT = b"Doe^John 1970-01-01"


def _raw_with_patient_name(root):
    make_msd(root)
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        os.rename(root / sub / f"a_000{suffix}", root / sub / f"{NAME}{suffix}")
    meta = json.loads((root / "dataset.json").read_text())
    meta["domains"]["dom_a"] = [NAME, "a_001", "a_002"]
    (root / "dataset.json").write_text(json.dumps(meta))
    for path in (root / "imagesTr").iterdir():
        img = nib.load(str(path))
        img.header["descrip"] = HEADER_TEXT
        img.header["aux_file"] = b"doe.txt"
        img.header["db_name"] = b"DoeJ"
        img.header["intent_name"] = b"john"
        nib.save(nib.Nifti1Image(img.get_fdata(), img.affine, img.header), str(path))
    # One broken case, so the skipped-case report (which names files) is checked too.
    (root / "imagesTr" / "b_001_0000.nii.gz").write_bytes(b"garbage")
    return root


def _traces(directory):
    found = []
    for dirpath, _, files in os.walk(directory):
        for name in files:
            data = open(os.path.join(dirpath, name), "rb").read()
            for needle in (NAME.encode(), b"Doe", b"doe.txt", b"DoeJ", b"john"):
                if needle in data or needle in name.encode():
                    found.append((os.path.join(dirpath, name), needle))
    return found


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return _raw_with_patient_name(tmp_path_factory.mktemp("raw_named"))


def test_no_identifier_reaches_outputs(raw, tmp_path):
    out, id_map = tmp_path / "prepared", tmp_path / "private" / "ids.json"
    manifest = prepare(str(raw), str(out), size=(16, 16), records_per_shard=8, workers=1,
                       skip_bad_cases=True, verbose=False, keep_identifiers=False,
                       identifier_map=str(id_map))
    assert _traces(out) == []
    assert sorted(manifest["cases"]) == ["dom_a_0000", "dom_a_0001", "dom_a_0002",
                                         "dom_b_0000", "dom_b_0002"]
    [skipped] = manifest["skipped_cases"]
    assert skipped["case_id"] == "dom_b_0001" and "<image>" in skipped["reason"]
    assert str(raw) not in json.dumps(manifest)
    mapping = json.loads(id_map.read_text())
    assert mapping["dom_a_0000"]["case_id"] == NAME  # the way back, kept apart

    # The MLflow run of a training on it (params, the manifest artifact) and the export.
    from uda_tf.serving.export import export_segmentor
    from uda_tf.training import tracking
    tracker = tracking.RunTracker(f"sqlite:///{tmp_path}/ml/mlflow.db", str(tmp_path),
                                  "privacy", "run")
    os.makedirs(tmp_path / "ml")
    tracker.log_params({"data_dir": str(out), "method": "grl"})
    tracker.log_artifact(str(out / "manifest.json"))
    assert tracker.flush()
    tracker.finish()
    assert _traces(tmp_path / "ml") == []
    export_segmentor(tiny_segmentor(), str(tmp_path / "export"), "m", manifest=manifest,
                     warmup_batch_sizes=(1,))
    assert _traces(tmp_path / "export") == []


def test_keep_identifiers_keeps_them(raw, tmp_path):
    prepare(str(raw), str(tmp_path / "kept"), size=(16, 16), records_per_shard=8, workers=1,
            skip_bad_cases=True, verbose=False, keep_identifiers=True)
    assert {n for _, n in _traces(tmp_path / "kept")} == {NAME.encode()}  # no header text


def test_identifier_map_inside_the_output_is_refused(raw, tmp_path):
    with pytest.raises(ValueError, match=r"--identifier_map=.*inside --output_dir"):
        prepare(str(raw), str(tmp_path / "o"), size=(16, 16), workers=1, verbose=False,
                skip_bad_cases=True, keep_identifiers=False,
                identifier_map=str(tmp_path / "o" / "ids.json"))
