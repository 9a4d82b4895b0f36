"""Every raw layout end to end through the four command lines, on files shaped like the
released data (tests/data/raw_layouts.py `release_*`: real orientation codes, oblique and
flipped affines, qform/sform codes, int16 with scl_slope/scl_inter, uint8 labels; nibabel's
real sample scans for MSD v1 and glob):

    python -m uda_tf.cli.prepare --layout=<layout> ...  ->  python train.py ... (1 step, exports)
    ->  python -m uda_tf.cli.predict ...  ->  python -m uda_tf.cli.evaluate ...

Each step is the command line's `main`, given the user's arguments through `absl.app.run` in
the test process (tests/cli_runner.py: the same flag parsing, checks and exit codes, without
four TensorFlow start-ups per layout; the process boundary itself is tested by the CLI tests
of each command), and must exit 0. Predictions must be one per
input case with the input's shape, affine, qform/sform (codes and matrices) and orientation;
evaluate's metrics.csv and summary.json must hold the expected cases and classes with values
in range.

The chains of the selected layouts run one after another from one module fixture; each test
then checks its own layout's outputs and prints the seconds each step took (`pytest -s`).
"""
import csv
import glob
import json
import math
import os
import time

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.cli_runner import run_cli
from tests.data import raw_layouts as raw
from uda_tf.cli.prepare_flags import LAYOUT_OPTION_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a user passes per layout, and what must come out. predict reads the raw layout
# (--layout with --input_dir and prepare's layout options); `images`/`labels`: {case id: file relative to the raw folder} expected from the file
# names alone (not from the code under test); `labels` None: the labels are pictures, which
# evaluate reads from the prepared test split (--data_dir --domain --model).
LAYOUTS = {
    "cc359": dict(
        make=raw.release_cc359, prepare=["--spacing=1,1,1"],
        train=["--source_domain=philips_15", "--target_domain=ge_3", "--method=grl"],
        classes=["brain"],
        images={c: f"Original/{c}_{tail}.nii.gz" for c, tail in (
            ("CC0001", "philips_15_55_M"), ("CC0002", "philips_15_43_F"),
            ("CC0003", "philips_15_61_M"), ("CC0101", "ge_3_39_M"), ("CC0102", "ge_3_58_F"))},
        labels={c: f"Silver-standard/{c}_{tail}_ss.nii.gz" for c, tail in (
            ("CC0001", "philips_15_55_M"), ("CC0002", "philips_15_43_F"),
            ("CC0003", "philips_15_61_M"), ("CC0101", "ge_3_39_M"),
            ("CC0102", "ge_3_58_F"))}),
    "crossmoda": dict(
        make=raw.release_crossmoda, prepare=["--spacing=0.5,0.5,1.5"],
        train=["--source_domain=ceT1", "--target_domain=hrT2", "--method=grl"],
        classes=["vestibular_schwannoma", "cochlea"],
        images={**{f"{b}_ceT1": f"source_training/{b}_ceT1.nii.gz" for b in (
            "crossmoda2021_ldn_1", "crossmoda2021_ldn_2", "crossmoda2022_etz_3")},
                **{f"{b}_hrT2": f"target_training/{b}_hrT2.nii.gz" for b in (
                    "crossmoda2021_ldn_106", "crossmoda2022_etz_107")}},
        labels={f"{b}_ceT1": f"source_training/{b}_Label.nii.gz" for b in (
            "crossmoda2021_ldn_1", "crossmoda2021_ldn_2", "crossmoda2022_etz_3")}),
    "msd_v1": dict(
        make=raw.release_msd_v1, layout="msd", prepare=["--spacing=4,4,4"],
        train=["--source_domain=BrainSample"], classes=["tissue", "bright"],
        images={**{f"brain_00{i}": f"imagesTr/brain_00{i}.nii.gz" for i in (1, 2, 3)},
                "brain_004": "imagesTs/brain_004.nii.gz"},
        labels={f"brain_00{i}": f"labelsTr/brain_00{i}.nii.gz" for i in (1, 2, 3)}),
    "msd_v2": dict(
        make=raw.release_msd_v2, layout="msd", prepare=["--spacing=1,1,2.5"],
        train=["--source_domain=Dataset003_Liver"],
        classes=["liver", "tumour"],
        images={**{f"liver_{i}": f"imagesTr/liver_{i}_0000.nii.gz" for i in (0, 1, 2)},
                **{f"liver_{i}": f"imagesTs/liver_{i}_0000.nii.gz" for i in (130, 131)}},
        labels={f"liver_{i}": f"labelsTr/liver_{i}.nii.gz" for i in (0, 1, 2)}),
    # four input channels per case (<case>_0000 .. _0003), stacked as the model's channels;
    # predict reads every channel's file of each case through the layout
    "nnunet_4ch": dict(
        make=raw.release_nnunet_multichannel, layout="msd", prepare=["--spacing=1,1,1"],
        train=["--source_domain=Dataset001_BrainTumour"], classes=["edema", "tumour"],
        channels=4,
        images={**{f"BRATS_00{i}": f"imagesTr/BRATS_00{i}_0000.nii.gz" for i in (1, 2, 3)},
                "BRATS_485": "imagesTs/BRATS_485_0000.nii.gz"},
        labels={f"BRATS_00{i}": f"labelsTr/BRATS_00{i}.nii.gz" for i in (1, 2, 3)}),
    "drive": dict(
        make=raw.release_drive, prepare=["--spacing=1,1,1"], train=["--source_domain=drive"],
        classes=["vessel"], domain="drive",
        images={**{f"{n}_training": f"training/images/{n}_training.tif" for n in (21, 22, 23)},
                **{f"0{n}_test": f"test/images/0{n}_test.tif" for n in (1, 2)}},
        labels=None),
    "stare": dict(
        make=raw.release_stare, prepare=["--spacing=1,1,1"], train=["--source_domain=stare"],
        classes=["vessel"], domain="stare",
        images={**{f"im000{n}": f"stare-images/im000{n}.ppm" for n in (1, 2, 3, 4)},
                "im0005": "stare-images/im0005.ppm.gz"},
        labels=None),
    "glob": dict(
        make=raw.release_glob,
        prepare=["--image_glob=scans/**/*_img.nii.gz", "--label_glob=segs/*_seg.nii.gz",
                 r"--case_regex=(?P<case>[pq]\d+)_", r"--domain_regex=scans/(?P<domain>\w+)/",
                 "--spacing=4,4,4"],
        train=["--source_domain=siteA", "--target_domain=siteB", "--method=minent",
               "--minent_weight=0.001"],
        classes=["foreground"],
        images={c: f"scans/{site}/{c}_img.nii.gz" for site, c in (
            ("siteA", "p01"), ("siteA", "p02"), ("siteA", "p03"), ("siteB", "q01"),
            ("siteB", "q02"))},
        labels={f"p0{i}": f"segs/p0{i}_seg.nii.gz" for i in (1, 2, 3)}),
}


def _step(name, module, args, log):
    """Runs one command line (`python -m <module> args`, in this process); returns its
    Completed (returncode, stdout, stderr) and logs (name, seconds, Completed)."""
    start = time.time()
    proc = run_cli(module, args)
    log.append((name, time.time() - start, proc))
    return proc


def _link_dir(directory, files):
    """<directory>/<case>.nii.gz symlinks to `files` {case: path}: evaluate pairs
    predictions and labels by the file name <case>.nii.gz."""
    os.makedirs(directory)
    for case, path in files.items():
        os.symlink(path, os.path.join(directory, f"{case}.nii.gz"))
    return directory


def run_chain(name, work, mlflow_uri):
    """prepare -> train -> predict -> evaluate for one layout under `work` (train tracks in
    `mlflow_uri`); stops at the first step that fails. Returns {"steps": [(step, seconds,
    CompletedProcess)], paths...}."""
    spec = LAYOUTS[name]
    layout = spec.get("layout", name)
    out = {"steps": [], "raw": os.path.join(work, "raw"), "work": work}
    spec["make"](out["raw"])
    prepared = out["prepared"] = os.path.join(work, "prepared")
    steps = out["steps"]
    proc = _step("prepare", "uda_tf.cli.prepare", [f"--layout={layout}",
                             f"--input_dir={out['raw']}", f"--output_dir={prepared}",
                             "--size=16,16", "--workers=1", "--noprogress", *spec["prepare"]],
                 steps)
    if proc.returncode:
        return out
    proc = _step("train", "uda_tf.cli.train", [
        f"--data_dir={prepared}", *spec["train"], "--epochs=1",
        "--steps_per_epoch=1", "--base_filters=2", "--unet_depth=2", "--global_batch_size=2",
        "--augment=none",
        f"--output_dir={work}/runs", "--run_name=e2e", "--model_name=e2e",
        f"--mlflow_tracking_uri={mlflow_uri}", "--mlflow_experiment=e2e",
        "--mlflow_sample_slices=0", "--backup_every_steps=0", "--notarget_criteria",
        "--nofigures", "--nomlflow_input_example"], steps)
    if proc.returncode:
        return out
    with open(os.path.join(work, "runs", "e2e", "result.json")) as f:
        out["result"] = json.load(f)
    model = out["result"]["saved_model"]
    predictions = out["predictions"] = os.path.join(work, "predictions")
    options = [a for a in spec["prepare"] if a.startswith(
        tuple(f"--{o}=" for o in LAYOUT_OPTION_FLAGS))]
    # predict reads the raw layout as prepare did, with the same layout options
    inputs = [f"--layout={layout}", f"--input_dir={out['raw']}", *options]
    proc = _step("predict", "uda_tf.cli.predict", [f"--model={model}", *inputs,
                             f"--output_dir={predictions}"], steps)
    if proc.returncode:
        return out
    evaluation = out["evaluation"] = os.path.join(work, "evaluation")
    if spec["labels"] is None:  # picture labels: the prepared test split
        args = [f"--data_dir={prepared}", f"--domain={spec['domain']}", f"--model={model}",
                "--split=test"]
    else:
        # evaluate pairs <case>.nii.gz in --predictions with <case>.nii.gz in --labels and
        # wants a label for every prediction: a user links the labelled cases under their
        # case ids (only MSD's labelsTr is named that way already).
        linked = os.path.join(work, "to_evaluate")
        preds = _link_dir(os.path.join(linked, "predictions"),
                          {c: os.path.join(predictions, f"{c}.nii.gz") for c in spec["labels"]})
        labels = _link_dir(os.path.join(linked, "labels"),
                           {c: os.path.join(out["raw"], p) for c, p in spec["labels"].items()})
        args = [f"--predictions={preds}", f"--labels={labels}", f"--manifest={prepared}"]
    _step("evaluate", "uda_tf.cli.evaluate", [*args, f"--output_dir={evaluation}", "--nofigures"],
          steps)
    return out


@pytest.fixture(scope="module")
def chains(request, tmp_path_factory, mlflow_store):
    """The chains of every layout selected in this session, one after another."""
    selected = sorted({item.callspec.params["layout"] for item in request.session.items
                       if item.module is request.module and hasattr(item, "callspec")})
    works = {name: str(tmp_path_factory.mktemp(name)) for name in selected}
    return {name: run_chain(name, work, mlflow_store(work)) for name, work in works.items()}


def _check_steps(chain):
    for step, _, proc in chain["steps"]:
        assert proc.returncode == 0, (
            f"{step} exited {proc.returncode}:\n{' '.join(proc.args)}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    assert [s for s, _, _ in chain["steps"]] == ["prepare", "train", "predict", "evaluate"]


def _check_nifti_prediction(prediction, source, num_classes):
    """`prediction` has the scan's on-disk shape, affine, qform/sform and orientation."""
    pred, scan = nib.load(prediction), nib.load(source)
    where = f"{prediction} (input {source})"
    assert pred.shape == scan.shape, where
    assert pred.get_data_dtype() == np.uint8, where
    np.testing.assert_allclose(pred.affine, scan.affine, atol=1e-4, err_msg=where)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(scan.affine), where
    for form in ("qform", "sform"):
        matrix, code = getattr(scan, f"get_{form}")(coded=True)
        if code:  # a form the input sets is kept with its code (an absent one may be added)
            got, got_code = getattr(pred, f"get_{form}")(coded=True)
            assert got_code == code, f"{where}: {form}_code {got_code}, input {code}"
            np.testing.assert_allclose(got, matrix, atol=1e-4, err_msg=f"{where} {form}")
    assert pred.header.get_xyzt_units()[0] == scan.header.get_xyzt_units()[0], where
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() < num_classes, (where, values)


def _check_picture_prediction(prediction, source, num_classes):
    """A picture's prediction is [rows, cols, 1] on its pixel grid."""
    if source.endswith(".gz"):
        import gzip
        with gzip.open(source) as f:
            width, height = Image.open(f).size
    else:
        width, height = Image.open(source).size
    pred = nib.load(prediction)
    assert pred.shape == (height, width, 1), (prediction, pred.shape, source)
    assert pred.get_data_dtype() == np.uint8
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() < num_classes, (prediction, values)


def _check_evaluation(chain, spec, manifest):
    with open(os.path.join(chain["evaluation"], "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(chain["evaluation"], "summary.json")) as f:
        summary = json.load(f)
    if spec["labels"] is None:
        domain = manifest["domains"][spec["domain"]]["cases"]
        expected = sorted(domain["test"])
        assert expected, "the prepared test split of a picture layout has a labelled case"
    else:
        expected = sorted(spec["labels"])
    assert sorted({r["case"] for r in rows}) == expected == summary["cases"]
    assert sorted({r["class"] for r in rows}) == sorted(spec["classes"])
    assert len(rows) == len(expected) * len(spec["classes"])
    assert sorted(summary["classes"]) == sorted(spec["classes"])
    for row in rows:
        for metric in ("dice", "surface_dice", "precision", "recall", "fscore"):
            value = float(row[metric])
            assert math.isnan(value) or 0.0 <= value <= 1.0, (row["case"], metric, value)
        dice = float(row["dice"])
        assert not math.isnan(dice) or row["both_empty"] in ("True", "1"), row
        for metric in ("assd", "hd95"):
            value = float(row[metric])
            assert math.isnan(value) or value >= 0.0, (row["case"], metric, value)
    for stats in summary["classes"].values():
        mean = stats["dice"]["mean"]
        assert mean is None or 0.0 <= mean <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_end_to_end(layout, chains):
    chain, spec = chains[layout], LAYOUTS[layout]
    print(f"\n{layout}: " + ", ".join(f"{s} {t:.1f} s" for s, t, _ in chain["steps"])
          + f"; total {sum(t for _, t, _ in chain['steps']):.1f} s")
    _check_steps(chain)
    with open(os.path.join(chain["prepared"], "manifest.json")) as f:
        manifest = json.load(f)
    assert [manifest["label_names"][str(i)]
            for i in range(1, manifest["num_classes"])] == spec["classes"]
    assert manifest["inputs"]["num_cases"] == len(spec["images"])
    if "channels" in spec:  # every channel file of a case is one input channel of the model
        assert manifest["image_shape"][-1] == spec["channels"]
    # one prediction per input case, nothing else (no temporary file left behind)
    written = sorted(os.listdir(chain["predictions"]))
    assert written == sorted(f"{c}.nii.gz" for c in spec["images"])
    for case, image in spec["images"].items():
        source = os.path.join(chain["raw"], image)
        prediction = os.path.join(chain["predictions"], f"{case}.nii.gz")
        if spec["labels"] is None:
            _check_picture_prediction(prediction, source, manifest["num_classes"])
        else:
            _check_nifti_prediction(prediction, source, manifest["num_classes"])
    _check_evaluation(chain, spec, manifest)
    # --nofigures (train and evaluate): numbers only, not one PNG
    assert not glob.glob(os.path.join(chain["work"], "**", "*.png"), recursive=True)


def test_release_headers_are_as_described(tmp_path):
    """The release builders write the storage the e2e tests rely on (else a test above
    could pass on plain RAS float32 files)."""
    raw.release_cc359(tmp_path / "cc")
    philips = nib.load(tmp_path / "cc" / "Original" / "CC0001_philips_15_55_M.nii.gz")
    ge = nib.load(tmp_path / "cc" / "Original" / "CC0101_ge_3_39_M.nii.gz")
    assert nib.aff2axcodes(philips.affine) == ("P", "I", "L")
    assert nib.aff2axcodes(ge.affine) == ("A", "S", "R")
    assert philips.get_data_dtype() == np.int16 and philips.dataobj.slope == 1.25
    assert int(ge.header["sform_code"]) == 0 and int(ge.header["qform_code"]) == 1
    raw.release_msd_v1(tmp_path / "v1")
    scan = nib.load(tmp_path / "v1" / "imagesTr" / "brain_001.nii.gz")
    assert scan.get_data_dtype() == np.dtype(">i2") and int(scan.header["sform_code"]) == 2
    assert (tmp_path / "v1" / "imagesTr" / "._brain_001.nii.gz").is_file()
    raw.release_glob(tmp_path / "g")
    scan = nib.load(tmp_path / "g" / "scans" / "siteA" / "p01_img.nii.gz")
    assert isinstance(scan, nib.Nifti2Image)
    assert not np.allclose(scan.affine[:3, :3], np.diag(np.diag(scan.affine[:3, :3])))
    raw.release_msd_v2(tmp_path / "v2")
    ct = nib.load(tmp_path / "v2" / "imagesTr" / "liver_0_0000.nii.gz")
    assert ct.dataobj.inter == -1024 and nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    assert glob.glob(str(tmp_path / "v2" / "labelsTr" / "*.nii.gz"))
