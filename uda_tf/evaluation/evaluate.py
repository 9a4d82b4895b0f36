"""Volume evaluation: every metric of uda_tf.metrics per case and class, in millimetres.

Two sources of volumes:

* a model on a prepared split (`--data_dir --domain --split --model`): slices are predicted in
  batches and reassembled by (case_id, slice_index) (3D records: whole volumes), and scored on
  the prepared grid with the prepared spacing of the manifest;
* NIfTI predictions against NIfTI labels in the original geometry (`--predictions=<dir>
  --labels=<dir>`, files `<case>.nii.gz`, as `python -m uda_tf.cli.predict` writes them), scored
  with the spacing of the files.

Writes `metrics.csv` (one row per case and foreground class: dice, surface_dice, assd, hd95,
precision, recall, fscore, both_empty, one_empty), `summary.json` (per class and averaged over
foreground classes: {"mean", "std", "n"} per metric, NaN rows left out of n; the surface Dice
tolerance, distance convention and cap; docs/methods.md, "Evaluation rules"), `boxplot.png` and
`overlays/<case>.png`; with `--mlflow_run_id` all of it is logged as artifacts of that run.

    python -m uda_tf.cli.evaluate --data_dir=demo_out/prepared --domain=scanner_b \
        --model=demo_out/runs/source_only/export/uda_demo_source_only/1 --output_dir=/tmp/eval
    python -m uda_tf.cli.evaluate --predictions=preds --labels=raw/labelsTr --output_dir=/tmp/eval
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import numpy as np

from uda_tf import metrics
from uda_tf.data.manifest import Manifest
from uda_tf.files import add_unique, atomic_write

METRIC_NAMES = metrics.METRICS
FLAGS_OF_ROW = ("both_empty", "one_empty")


# -- volumes --------------------------------------------------------------------------------
def _outputs(result) -> tuple[np.ndarray, np.ndarray | None]:
    """predict_fn may return labels, or a dict with `labels` (and optionally `entropy`)."""
    if isinstance(result, dict):
        entropy = result.get("entropy")
        return np.asarray(result["labels"]), None if entropy is None else np.asarray(entropy)
    return np.asarray(result), None


def predict_volumes(predict_fn, dataset, *, keep_images: bool = False) -> dict[str, dict]:
    """Run `predict_fn(images)` over a metadata dataset (`eval_dataset(..., with_metadata=
    True)`) and reassemble {case_id: {"pred", "ref"[, "image", "entropy"]}} volumes
    [H, W, D]. `keep_images` keeps the centre image channel and the entropy (for overlays).
    Cases stored without a label are left out: their zero labels are no reference."""
    slices, sizes = defaultdict(dict), {}
    volumes = {}
    for batch in dataset:
        labels, entropy = _outputs(predict_fn(batch["image"]))
        images = batch["image"].numpy() if keep_images else None
        for i, case in enumerate(batch["case_id"].numpy()):
            case = case.decode()
            if "has_label" in batch and not int(batch["has_label"][i]):
                continue
            item = {"pred": labels[i], "ref": batch["label"][i].numpy()}
            if keep_images:
                item["image"] = images[i][..., images.shape[-1] // 2]
                if entropy is not None:
                    item["entropy"] = entropy[i]
            if "slice_index" not in batch:  # 3D records: one whole volume per element
                volumes[case] = item
                continue
            slices[case][int(batch["slice_index"][i])] = item
            sizes[case] = int(batch["num_slices"][i])
    for case, by_index in slices.items():
        missing = sorted(set(range(sizes[case])) - set(by_index))
        if missing:
            raise ValueError(f"case {case}: slices {missing[:5]} missing from the shards")
        ordered = [by_index[k] for k in range(sizes[case])]
        volumes[case] = {key: np.stack([s[key] for s in ordered], axis=-1)
                         for key in ordered[0]}
    return volumes


def prepared_spacing(manifest: Manifest, case: str) -> tuple[float, float, float]:
    """mm per axis of a prepared volume [H, W, D]: the case's `prepared_spacing`, else the
    manifest's preprocessing spacing in the case's slice-axis order."""
    record = manifest.case(case)
    if record.get("prepared_spacing"):
        return tuple(float(s) for s in record["prepared_spacing"])
    spacing = manifest.preprocessing["spacing"]
    return tuple(float(spacing[a]) for a in record.get("axes", (0, 1, 2)))


# -- scores ---------------------------------------------------------------------------------
def score_volumes(volumes, label_names: dict[int, str], spacing=1.0, *,
                  tolerance_mm: float = metrics.DEFAULT_TOLERANCE_MM,
                  convention: str = "medpy", cap_mm: float | None = metrics.DEFAULT_CAP_MM):
    """One row per (case, foreground class). `volumes`: {case: (pred, ref)} or {case: {"pred",
    "ref", ...}}; `spacing`: mm per axis, one for all cases or {case: spacing}."""
    rows = []
    for case in sorted(volumes):
        item = volumes[case]
        pred, ref = (item["pred"], item["ref"]) if isinstance(item, dict) else item
        case_spacing = spacing[case] if isinstance(spacing, dict) else spacing
        for label, name in sorted(label_names.items()):
            if label == 0:
                continue
            values = metrics.binary_metrics(pred == label, ref == label, case_spacing,
                                            tolerance_mm=tolerance_mm, convention=convention,
                                            cap_mm=cap_mm)
            rows.append({"case": case, "class": name, "label": label,
                         **{m: values[m] for m in METRIC_NAMES},
                         **{f: values[f] for f in FLAGS_OF_ROW}})
    return rows


def _stats(values):
    """{"mean", "std", "n"} over the values; NaN (not defined) rows are left out of all three.
    JSON has no NaN: a statistic of nothing is null."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not values.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


def summarise(rows, label_names: dict[int, str], *,
              tolerance_mm: float = metrics.DEFAULT_TOLERANCE_MM, convention: str = "medpy",
              cap_mm: float | None = metrics.DEFAULT_CAP_MM) -> dict:
    """Per class over cases; `foreground`: per case the mean over foreground classes with a
    value (NaN classes left out), then statistics over cases; `both_empty`: per class, the
    cases where the class is in neither prediction nor reference."""
    cases = sorted({r["case"] for r in rows})
    summary = {"classes": {}, "foreground": {}, "cases": cases, "both_empty": {},
               "surface_dice_tolerance_mm": float(tolerance_mm),
               "distance_convention": convention,
               "distance_cap_mm": None if cap_mm is None else float(cap_mm)}
    for label, name in sorted(label_names.items()):
        if label == 0:
            continue
        mine = [r for r in rows if r["label"] == label]
        summary["classes"][name] = {m: _stats([r[m] for r in mine]) for m in METRIC_NAMES}
        summary["both_empty"][name] = sum(bool(r["both_empty"]) for r in mine)
    for m in METRIC_NAMES:
        per_case = []
        for case in cases:
            values = [r[m] for r in rows if r["case"] == case and not math.isnan(r[m])]
            per_case.append(float(np.mean(values)) if values else math.nan)
        summary["foreground"][m] = _stats(per_case)
    return summary


def write_results(rows, summary, output_dir: str) -> None:
    """metrics.csv and summary.json, each written to a temporary name then renamed."""
    os.makedirs(output_dir, exist_ok=True)
    with atomic_write(os.path.join(output_dir, "metrics.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", "label", *METRIC_NAMES,
                                               *FLAGS_OF_ROW])
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(os.path.join(output_dir, "summary.json")) as f:
        json.dump(summary, f, indent=2, allow_nan=False)


def _finish(volumes, label_names, spacing, output_dir, options, figures, extra) -> dict:
    """Score, summarise, write the files (and figures); returns the summary."""
    rows = score_volumes(volumes, label_names, spacing, **options)
    summary = {**summarise(rows, label_names, **options), **extra}
    write_results(rows, summary, output_dir)
    if figures:
        from uda_tf.evaluation import figures
        figures.box_plot(rows, [n for k, n in sorted(label_names.items()) if k],
                                  os.path.join(output_dir, "boxplot.png"))
        for case, item in sorted(volumes.items()):
            figures.overlay(case, item, len(label_names),
                                     os.path.join(output_dir, "overlays", f"{case}.png"))
    return summary


def evaluate_model(predict_fn, data_dir, manifest, domain, split, output_dir, *,
                   batch_size=32, oracle=False, tolerance_mm=metrics.DEFAULT_TOLERANCE_MM,
                   convention="medpy", cap_mm=metrics.DEFAULT_CAP_MM, figures=True) -> dict:
    """Predict, score and write results for one domain/split of a prepared dataset; returns
    the summary. `predict_fn(images)` returns labels, or {"labels", "entropy"}.

    `oracle` marks numbers computed from target-domain labels: reported, never used to pick a
    checkpoint."""
    from uda_tf.data.pipeline import eval_dataset
    label_names = manifest.label_names
    ds = eval_dataset(data_dir, manifest, domain, split, batch_size=batch_size,
                      with_metadata=True)
    volumes = predict_volumes(predict_fn, ds, keep_images=figures)
    if not volumes:
        raise ValueError(f"domain {domain!r}, split {split!r} of {data_dir} has no labelled "
                         "case to evaluate against")
    spacing = {case: prepared_spacing(manifest, case) for case in volumes}
    options = {"tolerance_mm": tolerance_mm, "convention": convention, "cap_mm": cap_mm}
    extra = {"domain": domain, "split": split, "oracle": bool(oracle), "grid": "prepared"}
    return _finish(volumes, label_names, spacing, output_dir, options, figures, extra)


# -- NIfTI predictions against NIfTI labels ------------------------------------------------
def _nifti_cases(directory: str, flag: str) -> dict[str, str]:
    """{case_id: path} of the <case>.nii(.gz) files in `directory` (maps such as
    <case>_entropy.nii.gz and hidden temporary files left out)."""
    from uda_tf.evaluation.predict import MAP_SUFFIXES, NIFTI_ENDINGS, case_id_of
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{flag}={directory} is not a directory")
    found = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not name.endswith(NIFTI_ENDINGS):
            continue
        case = case_id_of(name)
        if case.endswith(MAP_SUFFIXES):
            continue
        # x.nii.gz and x_0000.nii.gz, or x.nii and x.nii.gz
        add_unique(found, case, os.path.join(directory, name), lambda first, again: ValueError(
            f"{flag}={directory}: {first} and {again} are both case {case!r}; keep one (which "
            "one to score is not guessed)"))
    if not found:
        raise FileNotFoundError(f"{flag}={directory} holds no .nii/.nii.gz files")
    return found


def read_nifti_pairs(predictions_dir: str, labels_dir: str, *, images_dir: str | None = None,
                     keep_images: bool = True) -> tuple[dict, dict]:
    """({case: {"pred", "ref"[, "image", "entropy"]}} RAS arrays, {case: spacing}) for every
    prediction, with its label on the same grid (an error names the file otherwise)."""
    from uda_tf.data import io
    predictions = _nifti_cases(predictions_dir, "--predictions")
    labels = _nifti_cases(labels_dir, "--labels")
    missing = sorted(set(predictions) - set(labels))
    if missing:
        raise FileNotFoundError(f"--labels={labels_dir} has no label for predicted cases "
                                f"{missing[:5]} (expected <case>.nii.gz)")
    volumes, spacing = {}, {}
    for case, path in predictions.items():
        pred, ref = io.read_volume(path, is_label=True), io.read_volume(labels[case],
                                                                       is_label=True)
        if pred.array.shape != ref.array.shape or not np.allclose(pred.affine, ref.affine,
                                                                  atol=1e-3):
            raise ValueError(f"prediction {path} (shape {pred.original_shape}) is not on the "
                             f"grid of its label {labels[case]} (shape {ref.original_shape}, "
                             "or another affine); predict writes the input's geometry")
        item = {"pred": pred.array, "ref": ref.array}
        if keep_images:
            stem = os.path.join(predictions_dir, case)
            for suffix in (".nii.gz", ".nii"):
                if os.path.isfile(stem + "_entropy" + suffix):
                    item["entropy"] = io.read_volume(stem + "_entropy" + suffix).array
            if images_dir:
                for name in (f"{case}_0000.nii.gz", f"{case}.nii.gz", f"{case}_0000.nii",
                             f"{case}.nii"):
                    if os.path.isfile(os.path.join(images_dir, name)):
                        image = io.read_volume(os.path.join(images_dir, name))
                        item["image"] = image.array[..., 0] if image.array.ndim == 4 \
                            else image.array
                        break
        volumes[case], spacing[case] = item, tuple(pred.spacing)
    return volumes, spacing


def evaluate_niftis(predictions_dir: str, labels_dir: str, output_dir: str, *,
                    label_names: dict[int, str] | None = None, images_dir: str | None = None,
                    tolerance_mm=metrics.DEFAULT_TOLERANCE_MM, convention="medpy",
                    cap_mm=metrics.DEFAULT_CAP_MM, figures=True, oracle=False) -> dict:
    """Scores NIfTI predictions against NIfTI labels on the files' own grid and spacing.
    Without `label_names`, the classes are the label values found in either."""
    volumes, spacing = read_nifti_pairs(predictions_dir, labels_dir, images_dir=images_dir,
                                        keep_images=figures)
    if label_names is None:
        values = set()
        for item in volumes.values():
            values |= set(np.unique(item["pred"]).tolist()) | set(np.unique(item["ref"]).tolist())
        label_names = {int(v): str(v) for v in sorted(values | {0})}
    options = {"tolerance_mm": tolerance_mm, "convention": convention, "cap_mm": cap_mm}
    extra = {"predictions": os.path.abspath(predictions_dir),
             "labels": os.path.abspath(labels_dir), "oracle": bool(oracle), "grid": "original"}
    return _finish(volumes, label_names, spacing, output_dir, options, figures, extra)


def log_to_mlflow(output_dir: str, run_id: str, tracking_uri: str,
                  artifact_path: str = "evaluation") -> None:
    """Every file under `output_dir` as artifacts of an existing MLflow run."""
    import mlflow
    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"--mlflow_run_id={run_id}: no such run at --mlflow_tracking_uri="
                         f"{tracking_uri} ({e})") from e
    client.log_artifacts(run_id, output_dir, artifact_path=artifact_path)


# -- command line ---------------------------------------------------------------------------
def verify_split_shards(manifest: Manifest, data_dir: str, domain: str, split: str) -> int:
    """sha256 of the shards evaluate reads (`domain`/`split`) against the manifest
    (`integrity.verify_shards`, as train checks its domains); ShardCorruptedError names the
    shard. Returns the number checked."""
    from uda_tf.data.integrity import verify_shards
    return verify_shards({**manifest, "shards": manifest.shards(domain, split)}, data_dir)


def saved_model_predictor(path: str, *, tta: bool = False, manifest: Manifest | None = None,
                          data: str = "the prepared data"):
    """predict_fn of a SavedModel: prepared slices -> {"labels", "entropy"}; for 3D records
    (whole volumes) a Gaussian sliding window over patches of the model's input size.

    With `manifest`, the model's `image` input is checked against the records first (a
    ModelInputError naming both shapes, not a TensorFlow error in the first batch)."""
    from uda_tf.evaluation import inference
    from uda_tf.serving.export import image_input_shape, load_serving_fn
    serving = load_serving_fn(path)
    model_shape = image_input_shape(serving, path)[1:]
    fn = inference.saved_model_fn(serving)
    volumes = manifest is not None and manifest.record_kind == "volumes"
    if manifest is not None:
        inference.check_model_input(model_shape, manifest.image_shape, model=f"--model={path}",
                                    data=f"{data} (image_shape)", patches=volumes)
    if volumes:
        if None in model_shape[:3]:
            raise inference.ModelInputError(
                f"--model={path} takes patches of any size ({model_shape}); evaluate needs a "
                "model exported with a fixed patch size for its sliding window")
        fn = inference.flip_tta(fn, (1, 2, 3)) if tta else fn
        return inference.volume_predict_fn(fn, model_shape[:3])
    fn = inference.flip_tta(fn, (1, 2)) if tta else fn

    def predict(images):
        probs = fn(np.asarray(images))
        return {"labels": probs.argmax(-1), "entropy": inference.normalized_entropy(probs)}
    return predict
