"""Volume evaluation of a model on a prepared split.

Slices are predicted in batches, reassembled into volumes by (case_id, slice_index), and
scored per case and class in 3D. Writes `metrics.csv` (one row per case and class) and
`summary.json` (per class and over foreground classes: {"mean", "std", "n"}) as specified in
shared/ARCHITECTURE.md. First version: Dice only, on the prepared (resampled) grid.

    python -m uda_tf.evaluate --data_dir=demo_out/prepared --domain=scanner_b \
        --model=demo_out/runs/grl/export/uda_demo/1 --output_dir=/tmp/eval
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

from uda_tf.metrics import volume_dice

METRIC_NAMES = ("dice",)


def predict_volumes(predict_fn, dataset):
    """Run `predict_fn(images) -> int labels [N,H,W]` over a metadata dataset and reassemble
    {case_id: (prediction, reference)} volumes [H, W, num_slices]."""
    slices = defaultdict(dict)
    sizes = {}
    for batch in dataset:
        pred = np.asarray(predict_fn(batch["image"]))
        for i, case in enumerate(batch["case_id"].numpy()):
            case = case.decode()
            k = int(batch["slice_index"][i])
            slices[case][k] = (pred[i], batch["label"][i].numpy())
            sizes[case] = int(batch["num_slices"][i])
    volumes = {}
    for case, by_index in slices.items():
        missing = sorted(set(range(sizes[case])) - set(by_index))
        if missing:
            raise ValueError(f"case {case}: slices {missing[:5]} missing from the shards")
        pred = np.stack([by_index[k][0] for k in range(sizes[case])], axis=-1)
        ref = np.stack([by_index[k][1] for k in range(sizes[case])], axis=-1)
        volumes[case] = (pred, ref)
    return volumes


def score_volumes(volumes, label_names: dict[int, str]):
    """One row per (case, foreground class)."""
    rows = []
    for case in sorted(volumes):
        pred, ref = volumes[case]
        for label, name in sorted(label_names.items()):
            if label == 0:
                continue
            dice, both_empty = volume_dice(pred, ref, label)
            rows.append({"case": case, "class": name, "label": label, "dice": dice,
                         "both_empty": both_empty})
    return rows


def _stats(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()) if values.size else float("nan"),
            "std": float(values.std()) if values.size else float("nan"),
            "n": int(values.size)}


def summarise(rows, label_names: dict[int, str]) -> dict:
    """Per class over cases; `foreground` averages the per-case mean over foreground classes."""
    summary = {"classes": {}, "foreground": {}, "cases": sorted({r["case"] for r in rows})}
    for label, name in sorted(label_names.items()):
        if label == 0:
            continue
        mine = [r for r in rows if r["label"] == label]
        summary["classes"][name] = {m: _stats([r[m] for r in mine]) for m in METRIC_NAMES}
    for m in METRIC_NAMES:
        per_case = [np.mean([r[m] for r in rows if r["case"] == c]) for c in summary["cases"]]
        summary["foreground"][m] = _stats(per_case)
    return summary


def write_results(rows, summary, output_dir: str) -> None:
    """metrics.csv and summary.json, each written to a temporary name then renamed."""
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, "metrics.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", "label", *METRIC_NAMES,
                                               "both_empty"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    json_path = os.path.join(output_dir, "summary.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(json_path + ".tmp", json_path)


def evaluate_model(predict_fn, data_dir, manifest, domain, split, output_dir, *,
                   batch_size=32, oracle=False) -> dict:
    """Predict, score and write results for one domain/split; returns the summary.

    `oracle` marks numbers computed from target-domain labels: reported, never used to pick a
    checkpoint."""
    from uda_tf.data.pipeline import eval_dataset
    label_names = {int(k): v for k, v in manifest["label_names"].items()}
    ds = eval_dataset(data_dir, manifest, domain, split, batch_size=batch_size,
                      with_metadata=True)
    volumes = predict_volumes(predict_fn, ds)
    rows = score_volumes(volumes, label_names)
    summary = summarise(rows, label_names)
    summary.update({"domain": domain, "split": split, "oracle": bool(oracle)})
    write_results(rows, summary, output_dir)
    return summary


def saved_model_predictor(path: str):
    from uda_tf.export import load_serving_fn
    fn = load_serving_fn(path)
    return lambda images: fn(image=images)["labels"]


def main(argv):
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    from uda_tf.data.manifest import load_manifest
    manifest = load_manifest(FLAGS.data_dir)
    if FLAGS.domain not in manifest["domains"]:
        raise SystemExit(f"--domain={FLAGS.domain!r} is not in {FLAGS.data_dir}; "
                         f"domains there: {sorted(manifest['domains'])}")
    if not os.path.isdir(FLAGS.model):
        raise SystemExit(f"--model={FLAGS.model!r}: no SavedModel directory there")
    summary = evaluate_model(saved_model_predictor(FLAGS.model), FLAGS.data_dir, manifest,
                             FLAGS.domain, FLAGS.split, FLAGS.output_dir)
    for name, stats in summary["classes"].items():
        print(f"{name:>12s}  dice {stats['dice']['mean']:.4f} ± {stats['dice']['std']:.4f}"
              f"  (n={stats['dice']['n']})")
    print(f"{'foreground':>12s}  dice {summary['foreground']['dice']['mean']:.4f}")
    print(f"wrote {FLAGS.output_dir}/metrics.csv and summary.json")


def define_flags():
    from absl import flags
    flags.DEFINE_string("data_dir", None, "Prepared dataset (directory with manifest.json).")
    flags.DEFINE_string("domain", None, "Domain to evaluate.")
    flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to evaluate.")
    flags.DEFINE_string("model", None, "SavedModel directory (<name>/<version>).")
    flags.DEFINE_string("output_dir", None, "Where metrics.csv and summary.json go.")
    for name in ("data_dir", "domain", "model", "output_dir"):
        flags.mark_flag_as_required(name)


def run():
    from absl import app
    define_flags()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
