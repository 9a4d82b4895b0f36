"""Training-step time of every registered method relative to source-only (a benchmark, not a
test).

    .venv/bin/python benchmarks/train_step.py [--size=96,112] [--batch=8] [--steps=10]
        [--rounds=8] [--methods=grl,...] [--base_filters=16] [--jit_compile] [--mixed_precision]

Takes train.py's flags too (model, method options, --jit_compile, --mixed_precision). Every
method in uda_tf.methods.METHODS is built as train.py builds it (`from_flags` with
train.py's flag defaults, so a method merged later is timed with no change here) around the
same U-Net, and trained on the same in-memory batch: `--batch` source slices, plus as many
target slices for methods that use target data. After `--warmup` untimed steps (tracing,
compilation), `--steps` steps are timed through `fit`, in `--rounds` rounds that interleave the
methods (so that a change in machine load hits every method alike). The fastest round counts:
other processes on a shared machine only ever add time (the median is kept in the JSON).
The figure of merit is time per processed slice (source + target) relative to source-only,
with the targets of issues 4 and 14. Prints a table and writes benchmarks/results/train_step.json
with the load average before and after.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

from absl import app, flags, logging

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

#: per-slice time relative to source_only that each method should stay within (issue 4;
#: mean_teacher: issue 14)
TARGETS = {"grl": 1.15, "adversarial": 1.3, "mean_teacher": 1.25}
NUM_CLASSES = 4


def define_flags():
    flags.DEFINE_list("size", ["96", "112"], "Slice height,width (divisible by 8).")
    flags.DEFINE_integer("batch", 8, "Source slices per step (target methods add as many "
                         "target slices).", lower_bound=1)
    flags.DEFINE_integer("steps", 10, "Timed steps per method and round.", lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed steps per method first.", lower_bound=1)
    flags.DEFINE_integer("rounds", 8, "Rounds over all methods; the fastest counts.",
                         lower_bound=1)
    flags.DEFINE_list("methods", [], "Methods to time (default: every registered method); "
                      "source_only is always timed, as the reference.")
    flags.DEFINE_string("output", os.path.join(REPO, "benchmarks", "results",
                                               "train_step.json"), "JSON results file.")


def method_config(name: str) -> SimpleNamespace:
    """train.py's flag values (defaults, or as given here) for method `name`, with this
    benchmark's batch. Schedules see a long run, so that lambda ramps stay near their start."""
    from uda_tf.cli import train
    values = train.resolved_flags()
    values.update(method=name, global_batch_size=FLAGS.batch, epochs=1000,
                  steps_per_epoch=FLAGS.steps)
    if name == "minent" and not values["minent_weight"]:
        values["minent_weight"] = 1e-3  # MinEnt alone needs a weight (configs/minent_demo.cfg)
    if name == "mean_teacher":
        values["target_augment"] = "flip"  # its teacher's view (configs/mean_teacher_demo.cfg)
    if name == "attent":
        values["translation_epochs"] = 0  # the joint step: translation and segmentation
    return SimpleNamespace(**values)


def build(name, strategy, shape):
    import keras

    from uda_tf.methods import get_method
    from uda_tf.models import segmentor_from_flags
    cfg = method_config(name)
    manifest = {"image_shape": list(shape), "num_classes": NUM_CLASSES}
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    keras.utils.set_random_seed(0)
    with strategy.scope():
        method_cls = get_method(name)
        model = method_cls.build(segmentor_from_flags(vars(cfg), manifest), names,
                                 method_cls.configure(vars(cfg)), cfg)
    return model


def batch(uses_target, shape):
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    x_s = rng.random((FLAGS.batch, *shape), dtype=np.float32)
    y_s = rng.integers(0, NUM_CLASSES, (FLAGS.batch, *shape[:2])).astype(np.uint8)
    x_t = (0.5 + 0.5 * rng.random((FLAGS.batch, *shape))).astype(np.float32)
    element = ((x_s, y_s), x_t) if uses_target else (x_s, y_s)
    return tf.data.Dataset.from_tensors(element).repeat()


def timed_fit(model, ds, steps) -> float:
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - start


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    h, w = (int(v) for v in FLAGS.size)
    shape = (h, w, 1)
    load_before = os.getloadavg()
    from uda_tf.training import devices
    strategy = devices.make_strategy(1, cluster="none")
    import keras
    import tensorflow as tf

    from uda_tf.methods import METHODS
    if FLAGS.mixed_precision:
        keras.mixed_precision.set_global_policy(devices.mixed_precision_policy())
    names = ["source_only"] + [m for m in (FLAGS.methods or sorted(METHODS))
                               if m != "source_only"]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: {unknown} not registered; registered: "
                             f"{sorted(METHODS)}")
    # Build every model before warming any up: building seeds the global RNG, and TF drops
    # its cached kernels when the seed is set, which made the next step of an
    # already-warm method seconds slow.
    runs = {}
    for name in names:
        model = build(name, strategy, shape)
        runs[name] = {"model": model, "ds": batch(model.uses_target, shape), "rounds": [],
                      "slices": FLAGS.batch * (2 if model.uses_target else 1)}
    for name, run in runs.items():
        t = time.perf_counter()
        timed_fit(run["model"], run["ds"], FLAGS.warmup)
        run["warmup_s"] = time.perf_counter() - t
        print(f"{name}: warm-up {run['warmup_s']:.1f} s", file=sys.stderr)
    for r in range(FLAGS.rounds):
        for name in names:
            runs[name]["rounds"].append(timed_fit(runs[name]["model"], runs[name]["ds"],
                                                  FLAGS.steps) / FLAGS.steps)
    load_after = os.getloadavg()

    ref = min(runs["source_only"]["rounds"]) / runs["source_only"]["slices"]
    rows = []
    for name in names:
        step = min(runs[name]["rounds"])
        per_slice = step / runs[name]["slices"]
        target = TARGETS.get(name)
        rel = per_slice / ref
        rows.append({"method": name, "slices_per_step": runs[name]["slices"],
                     "ms_per_step": 1e3 * step,
                     "ms_per_step_median": 1e3 * statistics.median(runs[name]["rounds"]),
                     "ms_per_step_rounds":
                     [1e3 * s for s in runs[name]["rounds"]], "ms_per_slice": 1e3 * per_slice,
                     "relative_per_slice": rel, "target": target,
                     "meets_target": None if target is None else rel <= target,
                     "warmup_s": runs[name]["warmup_s"]})
    print(f"\n{h}x{w} slices, {FLAGS.batch} source slices per step, base_filters "
          f"{FLAGS.base_filters}, jit_compile={FLAGS.jit_compile}, mixed_precision="
          f"{FLAGS.mixed_precision}; fastest of {FLAGS.rounds} rounds x "
          f"{FLAGS.steps} steps")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"(1 min; {os.cpu_count()} CPUs)")
    print(f"{'method':<14}{'slices':>7}{'ms/step':>10}{'ms/slice':>10}{'x source':>10}"
          f"{'target':>8}")
    for row in rows:
        target = f"<={row['target']}" if row["target"] else ""
        mark = "" if row["meets_target"] in (None, True) else "  MISSED"
        print(f"{row['method']:<14}{row['slices_per_step']:>7}{row['ms_per_step']:>10.1f}"
              f"{row['ms_per_slice']:>10.2f}{row['relative_per_slice']:>10.3f}{target:>8}{mark}")
    result = {"benchmark": "train_step", "size": [h, w], "batch": FLAGS.batch,
              "steps": FLAGS.steps, "warmup": FLAGS.warmup, "rounds": FLAGS.rounds,
              "base_filters": FLAGS.base_filters, "jit_compile": FLAGS.jit_compile,
              "mixed_precision": FLAGS.mixed_precision,
              "policy": keras.mixed_precision.global_policy().name,
              "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
              "cpu_count": os.cpu_count(), "load_average_before": list(load_before),
              "load_average_after": list(load_after), "tensorflow": tf.__version__,
              "keras": keras.__version__, "methods": rows}
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    from uda_tf.cli import train
    train.define_flags()  # method options with train.py's defaults (see method_config)
    define_flags()
    app.run(main)
