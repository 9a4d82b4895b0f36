"""Volume evaluation: rows per case and class, the summary format and empty-mask rules, a model
on a prepared split, NIfTI predictions against NIfTI labels, figures, MLflow, the CLI."""
import csv
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from medpy.metric import binary as medpy

from uda_tf.evaluation.evaluate import (evaluate_model, evaluate_niftis, log_to_mlflow, predict_volumes,
                             prepared_spacing, score_volumes, summarise, write_results)
from uda_tf.metrics import volume_dice

NAMES = {0: "background", 1: "a", 2: "b"}
COLUMNS = ["case", "class", "label", "dice", "surface_dice", "assd", "hd95", "precision",
           "recall", "fscore", "both_empty", "one_empty"]


def test_volume_dice_and_empty_mask_rules():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1
    pred = np.zeros_like(ref)
    pred[:1] = 1
    assert volume_dice(pred, ref, 1) == pytest.approx((2 * 16 / (16 + 32), False))
    assert volume_dice(pred, ref, 2) == (1.0, True)      # absent from both: 1, flagged
    assert volume_dice(np.zeros_like(ref), ref, 1) == (0.0, False)  # absent from one: 0
    assert volume_dice(ref, np.zeros_like(ref), 1) == (0.0, False)


def test_summary_and_files(tmp_path):
    ref = np.zeros((4, 4, 2), np.uint8)
    ref[:2], ref[2:] = 1, 2
    perfect, swapped = ref.copy(), np.where(ref == 1, 2, 1).astype(np.uint8)
    only_a = np.where(ref == 2, 0, ref).astype(np.uint8)
    rows = score_volumes({"c1": (perfect, ref), "c2": (swapped, ref), "c3": (only_a, only_a)},
                         NAMES, spacing=(1.0, 1.0, 2.0), cap_mm=100.0)
    assert [(r["case"], r["class"], r["dice"]) for r in rows] == [
        ("c1", "a", 1.0), ("c1", "b", 1.0), ("c2", "a", 0.0), ("c2", "b", 0.0),
        ("c3", "a", 1.0), ("c3", "b", 1.0)]
    c3_b = rows[-1]
    assert c3_b["both_empty"] and math.isnan(c3_b["hd95"]) and c3_b["surface_dice"] == 1.0
    summary = summarise(rows, NAMES, cap_mm=100.0)
    dice_a = summary["classes"]["a"]["dice"]
    assert dice_a["mean"] == pytest.approx(2 / 3) and dice_a["n"] == 3
    hd_b = summary["classes"]["b"]["hd95"]  # the both-empty row is not counted
    assert hd_b["n"] == 2 and hd_b["mean"] == pytest.approx(1.0)  # (0 + 2) / 2: swapped by 2 mm
    assert summary["both_empty"] == {"a": 0, "b": 1}
    assert summary["foreground"]["dice"] == {"mean": pytest.approx(2 / 3),
                                             "std": pytest.approx(math.sqrt(2) / 3), "n": 3}
    assert summary["foreground"]["hd95"]["n"] == 3  # c3: the mean over its one defined class
    assert summary["surface_dice_tolerance_mm"] == 1.0 and summary["distance_cap_mm"] == 100.0
    write_results(rows, summary, str(tmp_path))
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and len(table) == 6
    saved = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN
    assert saved["cases"] == ["c1", "c2", "c3"]
    assert set(saved["classes"]["a"]) >= {"dice", "surface_dice", "assd", "hd95"}
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "summary.json"]  # no temporary


def test_evaluate_model_on_prepared_split(tiny_prepared, tmp_path):
    data_dir, manifest = tiny_prepared
    seen = []

    def empty_prediction(images):
        seen.append(images.shape[0])
        shape = images.shape[:3]
        return {"labels": np.zeros(shape, np.int32), "entropy": np.full(shape, 0.25)}

    summary = evaluate_model(empty_prediction, data_dir, manifest, "dom_b", "train",
                             str(tmp_path), batch_size=4, oracle=True)
    cases = manifest["domains"]["dom_b"]["cases"]["train"]
    assert summary["cases"] == sorted(cases) and summary["oracle"] is True
    assert summary["domain"] == "dom_b" and summary["split"] == "train"
    assert summary["classes"]["left"]["dice"]["mean"] == 0.0  # every class missed
    assert summary["classes"]["left"]["hd95"]["mean"] == 350.0  # capped
    assert summary["foreground"]["dice"]["n"] == len(cases)
    assert max(seen) == 4
    for name in ("metrics.csv", "summary.json", "boxplot.png",
                 *[f"overlays/{c}.png" for c in cases]):
        assert (tmp_path / name).stat().st_size > 0, name
    for case in cases:
        assert prepared_spacing(manifest, case) == (2.0, 2.0, 2.0)


def test_predict_volumes_reassembles_slices_and_skips_unlabelled_cases():
    import tensorflow as tf

    def batch(case_ids, indices, has_label):
        n = len(case_ids)
        images = np.stack([np.full((2, 3, 1), k, np.float32) for k in indices])
        return {"image": tf.constant(images), "label": tf.constant(images[..., 0] > 1),
                "case_id": tf.constant(case_ids), "slice_index": tf.constant(indices),
                "num_slices": tf.constant([3] * n), "has_label": tf.constant(has_label)}

    data = [batch(["a", "b", "a"], [2, 0, 0], [1, 0, 1]), batch(["a", "b", "b"], [1, 1, 2],
                                                                [1, 0, 0])]
    volumes = predict_volumes(lambda x: x.numpy()[..., 0].astype(int), data, keep_images=True)
    assert list(volumes) == ["a"]
    np.testing.assert_array_equal(volumes["a"]["pred"][0, 0], [0, 1, 2])
    np.testing.assert_array_equal(volumes["a"]["ref"][0, 0], [False, False, True])
    assert volumes["a"]["image"].shape == (2, 3, 3)
    with pytest.raises(ValueError, match="slices \\[1\\] missing"):
        predict_volumes(lambda x: x.numpy()[..., 0], data[:1])


def write_case(directory, name, array, affine):
    os.makedirs(directory, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), os.path.join(directory, f"{name}.nii.gz"))


@pytest.fixture
def nifti_pairs(tmp_path):
    """Predictions and labels stored LPS-like with anisotropic voxels (x0.7, y1.5, z3 mm)."""
    affine = np.diag([-0.7, -1.5, 3.0, 1.0])
    rng = np.random.default_rng(3)
    grid = np.ogrid[:30, :24, :10]
    ref = (((grid[0] - 15) / 8.0) ** 2 + ((grid[1] - 12) / 6.0) ** 2
           + ((grid[2] - 5) / 3.0) ** 2 <= 1).astype(np.uint8)
    pred = np.roll(ref, 2, axis=0) * (rng.random(ref.shape) > 0.05)
    write_case(tmp_path / "labels", "case_1", ref, affine)
    write_case(tmp_path / "preds", "case_1", pred.astype(np.uint8), affine)
    write_case(tmp_path / "preds", "case_1_entropy", rng.random(ref.shape).astype(np.float32),
               affine)
    write_case(tmp_path / "images", "case_1_0000", ref.astype(np.float32) * 50, affine)
    return tmp_path, pred, ref


def test_evaluate_niftis_uses_the_file_spacing(nifti_pairs):
    root, pred, ref = nifti_pairs
    summary = evaluate_niftis(str(root / "preds"), str(root / "labels"), str(root / "out"),
                              images_dir=str(root / "images"),
                              label_names={0: "background", 1: "blob"})
    # medpy on the on-disk arrays with the on-disk spacing: orientation does not matter.
    blob = summary["classes"]["blob"]
    assert blob["hd95"]["mean"] == pytest.approx(medpy.hd95(pred, ref, (0.7, 1.5, 3.0)))
    assert blob["assd"]["mean"] == pytest.approx(medpy.assd(pred, ref, (0.7, 1.5, 3.0)))
    assert blob["dice"]["mean"] == pytest.approx(medpy.dc(pred, ref))
    assert summary["grid"] == "original" and summary["cases"] == ["case_1"]
    assert (root / "out" / "overlays" / "case_1.png").stat().st_size > 0
    # without names, the classes are the label values found
    summary = evaluate_niftis(str(root / "preds"), str(root / "labels"), str(root / "out2"),
                              figures=False)
    assert list(summary["classes"]) == ["1"]


def test_evaluate_niftis_errors_name_the_file(nifti_pairs):
    root, pred, ref = nifti_pairs
    write_case(root / "preds", "case_2", pred.astype(np.uint8), np.eye(4))
    with pytest.raises(FileNotFoundError, match="case_2"):
        evaluate_niftis(str(root / "preds"), str(root / "labels"), str(root / "out"))
    write_case(root / "labels", "case_2", ref[:, :, :5], np.eye(4))
    with pytest.raises(ValueError, match="case_2.nii.gz"):
        evaluate_niftis(str(root / "preds"), str(root / "labels"), str(root / "out"))


def test_log_to_mlflow(nifti_pairs):
    import mlflow
    root, _, _ = nifti_pairs
    evaluate_niftis(str(root / "preds"), str(root / "labels"), str(root / "out"),
                    figures=False)
    uri = "sqlite:///" + str(root / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("eval"))
    log_to_mlflow(str(root / "out"), run.info.run_id, uri, "eval/target_test")
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval/target_test")}
    assert {"eval/target_test/metrics.csv", "eval/target_test/summary.json"} <= logged
    with pytest.raises(ValueError, match="--mlflow_run_id=nope"):
        log_to_mlflow(str(root / "out"), "nope", uri)


def test_evaluate_cli_on_niftis(nifti_pairs):
    root, _, _ = nifti_pairs
    cmd = [sys.executable, "-m", "uda_tf.cli.evaluate", f"--predictions={root / 'preds'}",
           f"--labels={root / 'labels'}", f"--output_dir={root / 'cli'}", "--nofigures",
           "--tolerance_mm=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((root / "cli" / "summary.json").read_text())[
        "surface_dice_tolerance_mm"] == 2.0
    done = subprocess.run(cmd[:3] + [f"--output_dir={root / 'cli'}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "--labels" in done.stderr
