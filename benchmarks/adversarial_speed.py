"""Training-step cost of the target-using methods against source-only (a benchmark, not a test).

    .venv/bin/python benchmarks/adversarial_speed.py [--size=96,112] [--batch=8] [--steps=15]

Times `fit` steps (medians of per-batch wall and process-CPU times after warm-up, variants
interleaved round by round) of the demo-size segmentor
(residual U-Net, --base_filters) with random data, and reports milliseconds per step and per
processed slice: source-only processes B slices a step, the others B source + B target. The
issue's target for the adversarial method is <= 1.3x source-only per processed slice, which
holds only if the segmentor runs once per step (on concat(source, target)) and the
discriminators are small next to it. Prints a table and writes
benchmarks/results/adversarial_speed.json.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from types import SimpleNamespace

from absl import app, flags

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (--method, flag overrides)
VARIANTS = {
    "source_only": ("source_only", {}),
    "minent": ("minent", {"minent_weight": 1e-3}),
    "grl": ("grl", {}),
    "adv feature": ("adversarial", {"adv_discriminators": "feature"}),
    "adv entropy": ("adversarial", {"adv_discriminators": "entropy"}),
    "adv both": ("adversarial", {}),
    "adv both patch": ("adversarial", {"patch_discriminators": True}),
    "adv both wgan-gp": ("adversarial", {"adv_loss": "wgan-gp"}),
    "adv both x3 disc": ("adversarial", {"disc_steps": 3}),
}


def define_flags():
    flags.DEFINE_list("size", ["96", "112"], "Slice height,width (the demo's prepared size).")
    flags.DEFINE_integer("batch", 8, "Source slices per step (target adds as many).",
                         lower_bound=1)
    flags.DEFINE_integer("base_filters", 16, "U-Net width (16: the demo model).", lower_bound=1)
    flags.DEFINE_integer("steps", 15, "Timed steps per variant.", lower_bound=3)
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing).", lower_bound=1)
    flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {list(VARIANTS)}.")
    flags.DEFINE_string("output", os.path.join(REPO, "benchmarks", "results",
                                               "adversarial_speed.json"), "JSON results file.")


def _cfg(**overrides):
    values = dict(dice_weight=1.0, minent_weight=0.0, grl_features="bottleneck", grl_lambda=1.0,
                  lambda_schedule="dann", domain_loss_weight=1.0, adv_discriminators="both",
                  patch_discriminators=False, adv_loss="bce", adv_feature_weight=1e-3,
                  adv_entropy_weight=1e-3, adv_both_domains=False, disc_steps=1, gp_weight=10.0,
                  seed=0, learning_rate=1e-4, disc_learning_rate=1e-4, jit_compile=False,
                  epochs=10, steps_per_epoch=100)
    values.update(overrides)
    return SimpleNamespace(**values)


class StepTimer:
    """Keras callback factory: wall and process-CPU seconds of each training batch. CPU time
    (all of this process's threads) is steadier than wall time on a machine shared with other
    jobs."""

    @staticmethod
    def make():
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.wall, self.cpu = [], []

            def on_train_batch_begin(self, batch, logs=None):
                self._w, self._c = time.perf_counter(), time.process_time()

            def on_train_batch_end(self, batch, logs=None):
                self.wall.append(time.perf_counter() - self._w)
                self.cpu.append(time.process_time() - self._c)

        return _Timer()


def build_variant(method, overrides, size, batch, base_filters):
    import keras
    import numpy as np
    import tensorflow as tf

    from uda_tf.methods import get_method
    from uda_tf.models.unet import residual_unet_2d

    keras.utils.set_random_seed(0)
    cls = get_method(method)
    cfg = _cfg(**overrides)
    seg = residual_unet_2d((*size, 1), 4, base_filters=base_filters)
    model = cls.from_flags(seg, ["bg", "a", "b", "c"], cfg)
    model.compile_from_flags(cfg)
    model.build_optimizers()
    rng = np.random.default_rng(0)
    x_s = rng.random((batch, *size, 1), dtype=np.float32)
    y_s = rng.integers(0, 4, (batch, *size)).astype(np.uint8)
    x_t = rng.random((batch, *size, 1), dtype=np.float32)
    element = ((x_s, y_s), x_t) if cls.uses_target else (x_s, y_s)
    ds = tf.data.Dataset.from_tensors(element).repeat()
    return model, ds, batch * (2 if cls.uses_target else 1)


def main(argv):
    del argv
    size = tuple(int(v) for v in FLAGS.size)
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    import numpy as np
    built, timers = {}, {}
    for name in FLAGS.variants:
        method, overrides = VARIANTS[name]
        built[name] = build_variant(method, overrides, size, FLAGS.batch, FLAGS.base_filters)
        built[name][0].fit(built[name][1], epochs=1, steps_per_epoch=FLAGS.warmup, verbose=0)
        timers[name] = StepTimer.make()
        print(f"  built and traced {name}", file=sys.stderr, flush=True)
    # Interleaved rounds, so a change in the machine's load hits every variant alike.
    for _ in range(FLAGS.steps // 3):
        for name, (model, ds, _) in built.items():
            model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0, callbacks=[timers[name]])
    rows = {}
    for name, (_, _, slices) in built.items():
        wall, cpu = float(np.median(timers[name].wall)), float(np.median(timers[name].cpu))
        rows[name] = {"ms_per_step": 1000 * wall, "cpu_ms_per_step": 1000 * cpu,
                      "slices_per_step": slices, "ms_per_slice": 1000 * wall / slices,
                      "cpu_ms_per_slice": 1000 * cpu / slices}
    base = rows.get("source_only", {}).get("ms_per_slice")
    cpu_base = rows.get("source_only", {}).get("cpu_ms_per_slice")
    print(f"\n{size[0]}x{size[1]} slices, batch {FLAGS.batch} (+{FLAGS.batch} target), "
          f"base_filters {FLAGS.base_filters}, median of {FLAGS.steps} steps, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':<20}{'ms/step':>9}{'ms/slice':>10}{'x/slice':>9}"
          f"{'cpu ms/step':>13}{'cpu x/slice':>13}")
    for name, r in rows.items():
        r["ratio_per_slice"] = r["ms_per_slice"] / base if base else float("nan")
        r["cpu_ratio_per_slice"] = r["cpu_ms_per_slice"] / cpu_base if cpu_base else float("nan")
        print(f"{name:<20}{r['ms_per_step']:>9.1f}{r['ms_per_slice']:>10.2f}"
              f"{r['ratio_per_slice']:>9.2f}{r['cpu_ms_per_step']:>13.1f}"
              f"{r['cpu_ratio_per_slice']:>13.2f}")
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    import tensorflow as tf
    with open(FLAGS.output, "w") as f:
        json.dump({"size": size, "batch": FLAGS.batch, "base_filters": FLAGS.base_filters,
                   "steps": FLAGS.steps, "device": {"cpus": os.cpu_count(),
                                                    "gpus": len(tf.config.list_physical_devices("GPU"))},
                   "versions": {"tensorflow": tf.__version__,
                                "python": platform.python_version()},
                   "rows": rows}, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    define_flags()
    app.run(main)
