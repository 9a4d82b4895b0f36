"""`python -m uda_tf.cli.prepare` with a flagfile, layout options, a split file and
--skip_bad_cases; flag errors name the flag. One subprocess per CLI run (TF start-up costs
seconds), the rest in-process."""
import json
import os
import subprocess
import sys

import pytest

from tests.data import raw_layouts as raw
from uda_tf.data import prepare as prepare_mod
from uda_tf.data import manifest as manifest_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")


def _cli(args, timeout=180):
    return subprocess.run([sys.executable, "-m", "uda_tf.cli.prepare", *args], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=timeout)


def test_cli_flagfile_glob_layout_split_file_and_skip(tmp_path):
    raw.make_glob(tmp_path / "raw")
    (tmp_path / "raw" / "scans" / "siteB" / "q02_img.nii.gz").write_bytes(b"broken")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"p01": "train", "p02": "val", "p03": "test",
                                      "q01": "train", "q02": "test"}))
    flagfile = tmp_path / "prepare.cfg"
    flagfile.write_text("\n".join([
        "--layout=glob", f"--input_dir={tmp_path / 'raw'}", f"--output_dir={tmp_path / 'out'}",
        "--image_glob=scans/**/*_img.nii.gz", "--label_glob=segs/*_seg.nii.gz",
        r"--case_regex=(?P<case>[pq]\d+)_", r"--domain_regex=scans/(?P<domain>site\w)/",
        "--label_names=background,organ,tumour", f"--split_file={split_file}",
        "--spacing=1.5,1.5,2", "--size=8,8", "--workers=2", "--skip_bad_cases",
        "--image_dtype=float16", "--keep_identifiers", ""]))  # ids are checked below
    proc = _cli([f"--flagfile={flagfile}"])
    assert proc.returncode == 0, proc.stderr
    assert "prepare [" in proc.stderr and "5/5 cases" in proc.stderr  # the progress bar
    manifest = manifest_lib.load_manifest(str(tmp_path / "out"))
    assert manifest["layout_options"]["image_glob"] == "scans/**/*_img.nii.gz"
    assert manifest["domains"]["siteA"]["cases"] == {"train": ["p01"], "val": ["p02"],
                                                     "test": ["p03"]}
    assert manifest["domains"]["siteB"]["labelled"] is False
    assert [e["case_id"] for e in manifest["skipped_cases"]] == ["q02"]
    assert "skipped 1 bad cases" in proc.stdout
    assert manifest["split"]["file_sha256"]


@pytest.mark.parametrize("args,expected", [
    (["--layout=msd", "--annotator=ah"], "layout 'msd' does not take annotator"),
    (["--size=8"], "size"),
    (["--output=volumes", "--context_slices=1"], "context_slices"),
])
def test_cli_errors_name_the_flag(tmp_path, args, expected):
    raw.make_msd_with_tests(tmp_path / "raw")
    proc = _cli([f"--input_dir={tmp_path / 'raw'}", f"--output_dir={tmp_path / 'out'}", *args],
                timeout=120)
    assert proc.returncode != 0 and expected in proc.stderr


def test_split_file_errors(tmp_path):
    raw.make_msd_with_tests(tmp_path / "raw")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"c_000": "train", "c_001": "val"}))
    with pytest.raises(ValueError, match=r"split.json does not assign cases \['c_002'\]"):
        prepare_mod.prepare(str(tmp_path / "raw"), str(tmp_path / "o"), size=(8, 8),
                            split_file=str(split_file), verbose=False)
    split_file.write_text(json.dumps({"c_000": "train", "c_001": "val", "c_002": "test",
                                      "t_000": "train"}))
    with pytest.raises(ValueError, match=r"unlabelled cases \['t_000'\] of labelled domain"):
        prepare_mod.prepare(str(tmp_path / "raw"), str(tmp_path / "o"), size=(8, 8),
                            split_file=str(split_file), verbose=False)
    split_file.write_text(json.dumps({"c_000": "holdout"}))
    with pytest.raises(ValueError, match=r"case 'c_000' has split 'holdout'"):
        prepare_mod.prepare(str(tmp_path / "raw"), str(tmp_path / "o"), size=(8, 8),
                            split_file=str(split_file), verbose=False)
