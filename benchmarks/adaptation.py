"""Does adaptation beat source-only on the built-in scanner shift? Methods x seeds, one table.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/adaptation.py [--seeds=0,1,2]
    # the same with strong augmentation, against the augmented baseline:
    PYTHONPATH=$PWD .venv/bin/python benchmarks/adaptation.py \
        --methods=source_only_augment,grl_augment \
        --json_out=benchmarks/results/adaptation_augment.json

Generates the phantom (scanner_a labelled source -> scanner_b unlabelled target) once, then
trains every method with every training seed through train.py as a user would, each run with
its method's config from configs/. Checkpoints are chosen on source validation Dice (train.py's
default --select_on=source_dice): target labels are read only by the final test evaluation.
Prints target test Dice per method as mean +- std over seeds, the paired per-seed gain over
source-only, and writes everything to benchmarks/results/adaptation.json.

A run whose result.json exists with the same flags is reused, so an interrupted benchmark
continues where it stopped (--rerun trains everything again).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from uda_tf.data.sharding import write_json_atomic  # noqa: E402
from uda_tf.cli.demo import _step  # noqa: E402  (the demo's quiet subprocess runner)

FLAGS = flags.FLAGS
flags.DEFINE_string("output_root", "/tmp/uda_adaptation", "Data, runs and MLflow store go here.")
flags.DEFINE_list("methods", ["source_only", "grl", "adversarial"],
                  "Runs to compare, by label; the first is the baseline of the paired gains. A "
                  "label is a registered method, or any name whose flagfile sets --method.")
flags.DEFINE_list("configs", ["source_only=configs/demo.cfg", "grl=configs/demo.cfg",
                              "adversarial=configs/adversarial_demo.cfg",
                              "source_only_augment=configs/source_only_augment_demo.cfg",
                              "grl_augment=configs/demo.cfg+--augment=full",
                              "adversarial_augment=configs/adversarial_demo.cfg+--augment=full"],
                  "label=flagfile pairs (relative to the repository) for each label's runs; "
                  "flags after the flagfile, joined by '+', are added to that label's runs "
                  "(grl_augment=configs/demo.cfg+--augment=full).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (the data is the same for all).")
flags.DEFINE_integer("subjects_per_domain", 20, "Phantom subjects per domain.", lower_bound=3)
flags.DEFINE_string("split", "0.6,0.1,0.3", "Train/val/test fractions per domain: 20 subjects "
                    "give 12/2/6, so every seed is scored on 6 unseen target volumes.")
flags.DEFINE_integer("data_seed", 0, "Seed of the phantom and of the case split.")
flags.DEFINE_multi_string("train_flag", [], "Extra flag for every training run "
                          "(e.g. --train_flag=--epochs=2); part of the reuse key.")
flags.DEFINE_boolean("rerun", False, "Train every run again even if its result exists.")
flags.DEFINE_string("json_out", os.path.join(REPO, "benchmarks", "results", "adaptation.json"),
                    "Where the results are written (atomically).")


def _config_map(pairs):
    """{label: (flagfile path, [extra flags])} from --configs."""
    out = {}
    for pair in pairs:
        method, sep, spec = pair.partition("=")
        path, *extra = spec.split("+")
        if not sep or not path:
            raise app.UsageError(f"--configs: {pair!r} is not label=flagfile[+--flag=value...]")
        path = path if os.path.isabs(path) else os.path.join(REPO, path)
        if not os.path.isfile(path):
            raise app.UsageError(f"--configs: {path} (for {method}) does not exist")
        bad = [e for e in extra if not e.startswith("--")]
        if bad:
            raise app.UsageError(f"--configs: {bad} (for {method}) are not --flag=value")
        out[method] = (path, extra)
    return out


def _method_of(label, flagfile):
    """The registered method a label trains: the label itself, or the flagfile's --method."""
    from uda_tf.methods import METHODS
    if label in METHODS:
        return label
    for line in open(flagfile):
        if line.startswith("--method="):
            return line.strip().split("=", 1)[1]
    raise app.UsageError(f"--methods: {label!r} is not a registered method and {flagfile} "
                         "sets no --method")


def _mean_std(values):
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "values": values}


def _fmt(stat):
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    configs = _config_map(FLAGS.configs)
    missing = [m for m in FLAGS.methods if m not in configs]
    if missing:
        raise app.UsageError(f"--configs names no flagfile for {missing}")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds must be integers, got {FLAGS.seeds}") from None
    root = os.path.abspath(FLAGS.output_root)
    raw, prepared, runs = (os.path.join(root, d) for d in ("raw", "prepared", "runs"))
    tracking_uri = "sqlite:///" + os.path.join(root, "mlflow.db")
    start = time.time()
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        _step("phantom", ["-m", "uda_tf.cli.phantom", f"--output_dir={raw}",
                          "--domains=scanner_a,scanner_b",
                          f"--subjects_per_domain={FLAGS.subjects_per_domain}",
                          f"--seed={FLAGS.data_seed}"])
    if not os.path.isfile(os.path.join(prepared, "manifest.json")):
        _step("prepare", ["-m", "uda_tf.cli.prepare", "--layout=msd", f"--input_dir={raw}",
                          f"--output_dir={prepared}", f"--split={FLAGS.split}",
                          f"--split_seed={FLAGS.data_seed}", "--spacing=2,2,2", "--size=96,112"])

    per_run = {}
    for method in FLAGS.methods:
        for seed in seeds:
            name = f"{method}_seed{seed}"
            flagfile, extra = configs[method]
            args = ["-m", "uda_tf.cli.train", f"--flagfile={flagfile}",
                    f"--method={_method_of(method, flagfile)}",
                    f"--data_dir={prepared}", f"--output_dir={runs}", f"--run_name={name}",
                    "--source_domain=scanner_a", "--target_domain=scanner_b",
                    f"--mlflow_tracking_uri={tracking_uri}", "--mlflow_experiment=adaptation",
                    f"--seed={seed}", "--overwrite", *extra, *FLAGS.train_flag]
            result_path = os.path.join(runs, name, "result.json")
            key_path = os.path.join(runs, name, "benchmark_args.json")
            reuse = (not FLAGS.rerun and os.path.isfile(result_path)
                     and os.path.isfile(key_path)
                     and json.load(open(key_path)) == args)
            if reuse:
                print(f"=== {name}: reusing {result_path}", flush=True)
            else:
                _step(f"train {name}", args)
                write_json_atomic(key_path, args)
            with open(result_path) as f:
                res = json.load(f)
            evals = res["evaluations"]
            per_run[name] = {
                "method": method, "seed": seed, "best_epoch": res["best_epoch"],
                "train_seconds": res["train_seconds"],
                "selection": res.get("selection"),
                "source_test_dice": evals["source"]["summary"]["foreground"]["dice"]["mean"],
                "target_test_dice": evals["target"]["summary"]["foreground"]["dice"]["mean"],
                "target_test_cases": len(evals["target"]["summary"]["cases"]),
                "target_classes": {c: v["dice"]["mean"] for c, v in
                                   evals["target"]["summary"]["classes"].items()},
            }

    base = FLAGS.methods[0]
    summary = {}
    for method in FLAGS.methods:
        rows = [per_run[f"{method}_seed{s}"] for s in seeds]
        entry = {"target_test_dice": _mean_std([r["target_test_dice"] for r in rows]),
                 "source_test_dice": _mean_std([r["source_test_dice"] for r in rows]),
                 "train_seconds": _mean_std([r["train_seconds"] for r in rows])}
        if method != base:
            gains = [per_run[f"{method}_seed{s}"]["target_test_dice"]
                     - per_run[f"{base}_seed{s}"]["target_test_dice"] for s in seeds]
            entry["gain_over_" + base] = _mean_std(gains)
            entry["wins"] = sum(g > 0 for g in gains)
        summary[method] = entry

    n_cases = per_run[f"{base}_seed{seeds[0]}"]["target_test_cases"]
    print(f"\n=== scanner_a -> scanner_b, {len(seeds)} seeds ({FLAGS.seeds}), target test Dice "
          f"(foreground mean over {n_cases} volumes); checkpoints chosen on source val Dice")
    w = max(14, *(len(m) + 2 for m in FLAGS.methods))
    gw = max(24, len(base) + 11)
    head = (f"{'method':<{w}}{'target Dice':>16}{'gain vs ' + base:>{gw}}{'wins':>6}"
            f"{'source Dice':>16}{'train s':>9}")
    print(head + "\n" + "-" * len(head))
    for method, e in summary.items():
        gain = _fmt(e[f"gain_over_{base}"]) if method != base else "-"
        wins = f"{e['wins']}/{len(seeds)}" if method != base else "-"
        print(f"{method:<{w}}{_fmt(e['target_test_dice']):>16}{gain:>{gw}}{wins:>6}"
              f"{_fmt(e['source_test_dice']):>16}{e['train_seconds']['mean']:>9.0f}")
    print("\nper seed (target test Dice):")
    for method in FLAGS.methods:
        vals = " ".join(f"{per_run[f'{method}_seed{s}']['target_test_dice']:.3f}" for s in seeds)
        print(f"  {method:<{w}}{vals}")

    out = {"command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/adaptation.py "
                      + " ".join(a for a in sys.argv[1:]),
           "seeds": seeds, "methods": FLAGS.methods,
           "configs": {m: " ".join([os.path.relpath(configs[m][0], REPO), *configs[m][1]])
                       for m in FLAGS.methods},
           "train_flags": FLAGS.train_flag, "subjects_per_domain": FLAGS.subjects_per_domain,
           "split": FLAGS.split, "selection": "source validation Dice (no target labels)",
           "summary": summary, "runs": per_run, "wall_seconds": time.time() - start}
    os.makedirs(os.path.dirname(FLAGS.json_out), exist_ok=True)
    write_json_atomic(FLAGS.json_out, out)
    print(f"\nwrote {FLAGS.json_out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
