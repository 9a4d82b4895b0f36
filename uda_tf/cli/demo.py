"""The end-to-end demo on built-in data: `make demo` (or `python -m uda_tf.cli.demo`).

Runs the real command-line tools one after another, as a user would:
phantom scans -> prepare -> train source_only -> train the best recipe measured on this shift
(source-only with strong, domain-randomised augmentation; each run: fit, keep the best
source-validation checkpoint, export a SavedModel, evaluate it) -> a table of target-domain test Dice per tissue
class. Steps whose outputs exist are skipped (data), or redone (runs).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

from uda_tf import files
from uda_tf.cli import entry

FLAGS = flags.FLAGS

#: The demo's runs beyond plain methods: name -> train.py flags after the shared config
#: (the recipes of benchmarks/accuracy.py, on the demo's budget).
RECIPES = {
    "source_only_augment": ("--method=source_only", "--augment=full"),
    "source_only_randomized": ("--method=source_only", "--augment=randomized"),
}
#: Source-only against the best recipe measured on this shift (benchmarks/RESULTS.md).
DEFAULT_RUNS = ("source_only", "source_only_randomized")
#: Epochs x steps per epoch of each demo run. Two runs of 6 x 50 steps made the demo 643 s on
#: the 2-core machine (fresh clone at 5759c50): over the 10-minute target, so 5 x 40.
DEMO_BUDGET = (5, 40)


def run_flags(name: str) -> list[str]:
    """train.py flags of one demo run: a recipe's, or --method=<name>."""
    return list(RECIPES.get(name, (f"--method={name}",)))


def write_train_config(path: str, config: str, source: str, target: str, tracking_uri: str,
                       budget: tuple[int, int]) -> None:
    """The demo runs' flagfile: the shared config, then the demo's budget, data, runs folder
    and MLflow store (paths relative to this file); later lines win, so the budget replaces
    the config's. `python train.py --flagfile=<path> --method=...` reruns a demo run."""
    with files.atomic_write(path) as f:
        f.write(f"# python train.py --flagfile={path} --method=grl --run_name=<name>   "
                "(written by the demo)\n"
                f"--flagfile={config}\n--epochs={budget[0]}\n--steps_per_epoch={budget[1]}\n"
                "--data_dir=prepared\n--output_dir=runs\n"
                f"--source_domain={source}\n--target_domain={target}\n"
                f"--mlflow_tracking_uri={tracking_uri}\n")


def define_flags():
    flags.DEFINE_string("output_root", "demo_out", "Everything the demo writes goes here.")
    flags.DEFINE_string("config", "uda:demo", "Training flagfile shared by the demo's runs: "
                        "uda:NAME (a config shipped with uda_tf) or a path.")
    flags.DEFINE_list("methods", list(DEFAULT_RUNS), "What to train and compare: a registered "
                      f"--method name or a recipe ({', '.join(RECIPES)}: a method with its "
                      "settings, as benchmarks/accuracy.py runs it).")
    flags.DEFINE_list("domains", ["scanner_a", "scanner_b"], "Phantom domains: source, target.")
    flags.DEFINE_integer("subjects_per_domain", 10, "Phantom subjects per domain.", lower_bound=3)
    flags.DEFINE_string("split", "0.6,0.2,0.2", "Train/val/test fractions per domain (the demo "
                        "keeps 2 of 10 volumes per domain for testing).")
    flags.DEFINE_integer("seed", 0, "Seed of the phantom and of training.")
    flags.DEFINE_integer("epochs", DEMO_BUDGET[0], "Epochs of each run (in place of the "
                         "config's): the defaults keep make demo within 10 minutes on 2 CPU "
                         "cores.", lower_bound=1)
    flags.DEFINE_integer("steps_per_epoch", DEMO_BUDGET[1], "Training steps per epoch of each "
                         "run (in place of the config's).", lower_bound=1)
    flags.DEFINE_multi_string("train_flag", [], "Extra flag passed to every training run, "
                              "e.g. --train_flag=--epochs=2.")


# TensorFlow's C++ start-up lines (oneDNN, CUDA probing on a CPU machine) are printed before
# its logging can be configured; the demo drops them from the child's stderr and keeps the rest.
_STARTUP_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|"
                            r"[IWE]0000 00:00:|To enable the following instructions)")


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow and lets it find its devices in this process with its C++ start-up
    lines dropped, as they are from the children's stderr (written to file descriptor 2)."""
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
            tensorflow.config.list_physical_devices()  # the CUDA probe, on a CPU machine
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        for line in captured:
            if not _STARTUP_NOISE.match(line):
                sys.stderr.write(line)


def _step(title, args):
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.time()
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if not _STARTUP_NOISE.match(line):
            sys.stderr.write(line)
            sys.stderr.flush()
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"demo: step '{title}' failed (exit {proc.returncode}); see above")
    seconds = time.time() - start
    print(f"--- done in {seconds:.0f} s", flush=True)
    return seconds


def format_table(results: dict) -> str:
    """Target test Dice per class for each method (rows), from the runs' result.json."""
    first = next(iter(results.values()))["evaluations"]["target"]["summary"]
    classes = list(first["classes"])
    width = max(12, *(len(m) for m in results))
    head = f"{'method':<{width}}" + "".join(f"{c:>9}" for c in classes) + f"{'mean':>9}"
    lines = [head, "-" * len(head)]
    for method, res in results.items():
        s = res["evaluations"]["target"]["summary"]
        cells = "".join(f"{s['classes'][c]['dice']['mean']:>9.3f}" for c in classes)
        lines.append(f"{method:<{width}}{cells}{s['foreground']['dice']['mean']:>9.3f}")
    return "\n".join(lines)


def comparison_figure(results: dict, prepared: str, domain: str, path: str) -> str | None:
    """One picture of every method's exported model on the same target test slices, with
    its errors (uda_tf/evaluation/figures.py; the labels are drawn, never used)."""
    _import_tensorflow_quietly()
    from uda_tf.data.manifest import load_manifest
    from uda_tf.evaluation import figures
    from uda_tf.serving.export import load_serving_fn
    return figures.compare_methods(
        {m: load_serving_fn(r["saved_model"]) for m, r in results.items()}, prepared,
        load_manifest(prepared), domain, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = entry.resolve_flagfile(FLAGS.config)
    except entry.FlagfileError as e:
        raise app.UsageError(str(e).replace("--flagfile=", "--config=")) from None
    if not os.path.isfile(config):
        raise app.UsageError(f"--config={FLAGS.config}: no such flagfile")
    config = FLAGS.config if FLAGS.config.startswith(entry.PACKAGED) else os.path.abspath(config)
    if len(FLAGS.domains) != 2:
        raise app.UsageError(f"--domains needs two names (source,target), got {FLAGS.domains}")
    _import_tensorflow_quietly()
    from uda_tf.methods import METHODS
    unknown = [m for m in FLAGS.methods if m not in RECIPES and m not in METHODS]
    if unknown or not FLAGS.methods:
        raise app.UsageError(f"--methods: {unknown or 'none given'}; expected methods "
                             f"{sorted(METHODS)} or recipes {sorted(RECIPES)}")
    start = time.time()
    root = os.path.abspath(FLAGS.output_root)
    raw, prepared, runs = (os.path.join(root, d) for d in ("raw", "prepared", "runs"))
    tracking_uri = "sqlite:///" + os.path.join(root, "mlflow.db")
    source, target = FLAGS.domains

    if os.path.isfile(os.path.join(raw, "dataset.json")):
        print(f"=== phantom data already in {raw}")
    else:
        _step("1. generate the built-in phantom scans (NIfTI, nnU-Net layout)",
              ["-m", "uda_tf.cli.phantom", f"--output_dir={raw}",
               f"--domains={','.join(FLAGS.domains)}",
               f"--subjects_per_domain={FLAGS.subjects_per_domain}", f"--seed={FLAGS.seed}"])
    _step("2. prepare: RAS, resample, normalise, slice, shard",
          ["-m", "uda_tf.cli.prepare", "--layout=msd", f"--input_dir={raw}",
           f"--output_dir={prepared}", f"--split={FLAGS.split}", "--spacing=2,2,2",
           "--size=96,112"])
    # The runs' flagfile: the shared config plus where this demo's data, runs and MLflow store
    # are (paths relative to this file); `python train.py --flagfile=<it> --method=...` reruns.
    train_cfg = os.path.join(root, "train.cfg")
    write_train_config(train_cfg, config, source, target, tracking_uri,
                       (FLAGS.epochs, FLAGS.steps_per_epoch))
    results = {}
    for i, method in enumerate(FLAGS.methods, start=3):
        _step(f"{i}. train {method}: {source} (labelled) -> {target} (unlabelled)",
              ["-m", "uda_tf.cli.train", f"--flagfile={train_cfg}", *run_flags(method),
               f"--run_name={method}", f"--seed={FLAGS.seed}", "--overwrite",
               # one SavedModel name per method, and one registered model with a version
               # per run, each under its name as alias: models:/uda_demo@source_only_randomized
               f"--model_name=uda_demo_{method}", "--register_model_name=uda_demo",
               f"--register_alias={method}",
               *FLAGS.train_flag])
        with open(os.path.join(runs, method, "result.json")) as f:
            results[method] = json.load(f)

    summary = next(iter(results.values()))["evaluations"]["target"]["summary"]
    print(f"\n=== Target domain ({target}) test Dice, {len(summary['cases'])} volumes; "
          f"checkpoints chosen on {source} validation Dice (no target labels)")
    print(format_table(results))
    print("\nSavedModels (TF Serving layout <name>/<version>):")
    for method, res in results.items():
        print(f"  {method:<12} {res['saved_model']}")
    print(f"MLflow runs:  {tracking_uri}\n  view them:  .venv/bin/{res['mlflow']['ui']}")
    picture = comparison_figure(results, prepared, target, os.path.join(root, "comparison.png"))
    if picture:
        print(f"The methods side by side on {target} test slices, with their errors: {picture}")
    print(f"Demo wall time: {time.time() - start:.0f} s (outputs in {root})")
    with open(os.path.join(root, "demo_summary.json"), "w") as f:
        json.dump({m: {"saved_model": r["saved_model"], "run_dir": r["run_dir"],
                       "target_test": r["evaluations"]["target"]["summary"]}
                   for m, r in results.items()}, f, indent=2)


ABOUT = """The end-to-end demo on built-in data (what `make demo` runs): simulated scans of
two scanners -> prepare -> train source_only and source_only_randomized (the best recipe
measured on this shift, benchmarks/RESULTS.md) -> export -> evaluate -> a table of
target-domain Dice. Steps whose outputs exist are skipped."""


def run():
    entry.run(main, define_flags, ABOUT)


if __name__ == "__main__":
    run()
