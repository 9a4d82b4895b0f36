"""Planning (uda_tf/data/plan.py, python -m uda_tf.cli.plan): the fingerprint of a raw
dataset from its headers, the rules that turn it into settings, and the flagfiles it writes,
run end to end: plan -> prepare --flagfile=prepare.cfg -> train.py --flagfile=train.cfg."""
import json

import numpy as np
import pytest

from tests.cli_runner import run_cli
from tests.helpers import make_msd
from uda_tf.data import layouts, plan


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_msd(tmp_path_factory.mktemp("plan_raw"))


def test_fingerprint_reads_ras_geometry_from_headers(raw):
    fp = plan.fingerprint(layouts.read_layout("msd", str(raw)), intensity_cases=2)
    assert sorted(fp["domains"]) == ["dom_a", "dom_b"]
    b = fp["domains"]["dom_b"]
    assert (b["cases"], b["labelled"]) == (3, 3)
    # the LPS case (1.6 x 2.5 x 3 mm, flipped axes): spacing and shape in RAS order
    lps = next(c for c in fp["cases"] if c["case_id"].startswith("b_") and c["spacing"][2] == 3)
    assert lps["spacing"] == pytest.approx((1.6, 2.5, 3.0)) and lps["shape"] == (20, 24, 10)
    assert b["spacing_max"] == pytest.approx([2.0, 2.5, 3.0])
    assert b["intensity"]["cases"] == 2
    assert b["intensity"]["p0.5"] <= b["intensity"]["p50"] <= b["intensity"]["p99.5"]


def test_header_geometry_is_what_reading_the_scan_gives(raw, tmp_path):
    """The plan's geometry, from headers only, equals the shape and spacing `read_volume`
    gives (RAS order; a picture is [rows, cols, 1])."""
    from tests.data import raw_layouts
    from uda_tf.data import io
    raw_layouts.make_drive(tmp_path / "drive")
    cases = [*layouts.read_layout("msd", str(raw)).cases,
             *layouts.read_layout("drive", str(tmp_path / "drive")).cases[:1]]
    for case in cases:
        geometry, volume = plan.case_geometry(case), io.read_volume(case.image_path)
        assert geometry.shape == volume.array.shape[:3], case.image_path
        assert geometry.spacing == pytest.approx(volume.spacing), case.image_path


def _fp(spacings, shapes, low=0.0, picture=False, labelled=True):
    cases = [{"case_id": f"c{i}", "domain": "s" if i % 2 == 0 else "t",
              "labelled": labelled or i % 2 == 1, "spacing": tuple(sp), "shape": tuple(sh)}
             for i, (sp, sh) in enumerate(zip(spacings, shapes))]
    domains = {d: {"cases": sum(c["domain"] == d for c in cases),
                   "labelled": sum(c["domain"] == d and c["labelled"] for c in cases),
                   "intensity": {"p0.5": low}, "picture": picture} for d in ("s", "t")}
    return {"dataset": "x", "label_names": {"0": "background"}, "domains": domains,
            "cases": cases}


def test_rules():
    # thick slices along y (coronal): sliced across y; size covers the largest case
    fp = _fp([(1, 4, 1)] * 6, [(100, 30, 90)] * 5 + [(130, 30, 90)])
    s = plan.suggest(fp, source="s", target="t", unet_depth=3)
    assert s["prepare"]["spacing"] == "1,4,1" and s["prepare"]["slice_axis"] == "coronal"
    assert s["prepare"]["size"] == "136,96"  # x: 130 -> 136, z: 90 -> 96 (multiples of 8)
    assert s["prepare"]["normalization"] == "zscore"
    assert s["train"]["select_on"] == "source_dice" and s["train"]["epochs"] == 10
    assert plan.suggest(fp, source="s", target="t", gpus=2)["train"]["epochs"] == 100
    # CT-like intensities: clipped and scaled, not z-scored
    ct = plan.suggest(_fp([(1, 1, 1)] * 6, [(64, 64, 64)] * 6, low=-1024.0), source="s",
                      target=None)
    assert ct["prepare"]["normalization"] == "minmax" and "target_domain" not in ct["train"]
    # 3D: the patch holds at most 2^21 voxels, a multiple of 2^depth per axis
    big = plan.suggest(_fp([(1, 1, 1)] * 6, [(250, 250, 250)] * 6), source="s", target="t",
                       dims=3)
    patch = [int(v) for v in big["train"]["patch_size"].split(",")]
    assert np.prod(patch) <= 2**21 and all(v % 8 == 0 for v in patch)
    assert big["prepare"]["size"] == "256,256,256" and big["train"]["model"] == "unet3d"
    # the size is capped; the plan says the largest cases are cropped
    huge = plan.suggest(_fp([(0.5, 0.5, 1)] * 6, [(2000, 600, 50)] * 6), source="s",
                        target="t")
    assert huge["prepare"]["size"] == "512,512" and any("cropped" in w for w in huge["warnings"])
    with pytest.raises(ValueError, match="'nope' is not in the data"):
        plan.suggest(fp, source="nope", target=None)
    with pytest.raises(ValueError, match="no labelled case"):
        plan.suggest(_fp([(1, 1, 1)] * 6, [(8, 8, 8)] * 6, labelled=False), source="s",
                     target="t")


def test_prepared_rules():
    fp = {"dataset": "x", "label_names": {}, "record_kind": "slices", "image_shape": [24, 40, 1],
          "spacing": [1, 1, 1], "domains": {
              "s": {"cases": 10, "cases_per_split": {"train": 6, "val": 2, "test": 2},
                    "labelled": 10, "labelled_train": 6, "train_records": 600},
              "t": {"cases": 10, "cases_per_split": {"train": 6}, "labelled": 0,
                    "labelled_train": 0, "train_records": 600}}}
    s = plan.suggest_for_prepared(fp, source="s", target="t", unet_depth=4)
    # 24 x 40 divides by 2^3, not 2^4: the depth comes down and the plan says so
    assert s["train"]["unet_depth"] == 3 and "unet_depth=3" in s["warnings"][0]
    assert s["train"]["global_batch_size"] == 64 and s["train"]["steps_per_epoch"] == 50
    with pytest.raises(ValueError, match="no labelled training case"):
        plan.suggest_for_prepared(fp, source="t", target="s")


def test_plan_prepare_train_end_to_end(raw, tmp_path, mlflow_store):
    out = tmp_path / "plan"
    proc = run_cli("uda_tf.cli.plan", ["--layout=msd", f"--input_dir={raw}",
                                       f"--output_dir={out}", "--intensity_cases=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--spacing=2,2,2" in proc.stdout and "dom_b" in proc.stdout
    written = json.loads((out / "plan.json").read_text())
    assert written["source_domain"] == "dom_a" and written["target_domain"] == "dom_b"
    # median spacing 2 mm; the LPS case's 60 mm along y gives 30 voxels -> 32
    assert written["plan"]["prepare"]["size"] == "24,32"

    proc = run_cli("uda_tf.cli.prepare", [f"--flagfile={out / 'prepare.cfg'}", "--workers=1",
                                          "--noprogress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    assert manifest["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    assert manifest["preprocessing"]["normalization"] == "zscore"
    assert manifest["image_shape"][:2] == [24, 32]

    proc = run_cli("uda_tf.cli.train", [
        f"--flagfile={out / 'train.cfg'}", "--epochs=1", "--steps_per_epoch=1",
        "--base_filters=2", "--global_batch_size=2", "--nofigures", "--run_name=planned",
        "--nomlflow_input_example",
        f"--mlflow_tracking_uri={mlflow_store(tmp_path)}", "--nomlflow_system_metrics"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "runs" / "planned" / "result.json").is_file()

    # the prepared dataset planned again (--data_dir): train.cfg only, same data
    proc = run_cli("uda_tf.cli.plan", [f"--data_dir={out / 'prepared'}",
                                       f"--output_dir={tmp_path / 'plan2'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (tmp_path / "plan2" / "train.cfg").read_text()
    assert f"--data_dir={out / 'prepared'}" in again and "--source_domain=dom_a" in again
    assert not (tmp_path / "plan2" / "prepare.cfg").exists()
    proc = run_cli("uda_tf.cli.plan", [f"--data_dir={out / 'prepared'}", "--layout=msd",
                                       f"--output_dir={tmp_path / 'plan3'}"])
    assert proc.returncode != 0 and "one of the two" in proc.stderr

    # a second plan into the same folder keeps the first unless --overwrite
    before = (out / "train.cfg").read_text()
    proc = run_cli("uda_tf.cli.plan", ["--layout=msd", f"--input_dir={raw}",
                                       f"--output_dir={out}", "--target_domain=dom_a",
                                       "--source_domain=dom_b"])
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (out / "train.cfg").read_text() == before
