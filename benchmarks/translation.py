"""How well do AttENT's translators learn a built-in shift? Translation alone (AttENT's first
phase), measured against the true paired rendering (a benchmark, not a test).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/translation.py \
        [--source_domain=scanner_a] [--target_domain=t2like] [--steps=300] [--every=50] \
        [--variants=attent,cyclegan] [--learning_rate=1e-3] [--cycle_weight=10] ...

Training images: the source renderings of phantom subjects 0..N-1 and, unpaired, the target
renderings of subjects N..2N-1 (`uda_tf.data.paired`, prepared as the demo prepares: 2 mm,
96 x 112 axial slices, 1-99th percentile min-max). Every `--every` steps, G_st translates the
source images of 2 new subjects (indices from 1000) and is scored against their true target
rendering with `uda_tf.metrics.translation_fidelity`: MAE, SSIM and the mean absolute error of
the per-tissue mean intensities (what a contrast change must get right), next to the same
scores of the untranslated images. Variants: `attent` (attention gates on the skips) and
`cyclegan` (the same translators without gates). Prints a table per variant and writes JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
VARIANTS = {"attent": True, "cyclegan": False}  # name: attention gates


def define_flags():
    flags.DEFINE_string("source_domain", "scanner_a", "Phantom source domain.")
    flags.DEFINE_string("target_domain", "t2like", "Phantom target domain.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Translators to train: {list(VARIANTS)}.")
    flags.DEFINE_integer("steps", 300, "Translation steps per variant.", lower_bound=1)
    flags.DEFINE_integer("every", 50, "Steps between fidelity measurements.", lower_bound=1)
    flags.DEFINE_integer("batch", 8, "Images per domain per step.", lower_bound=1)
    flags.DEFINE_integer("subjects", 4, "Training subjects per domain.", lower_bound=1)
    flags.DEFINE_integer("filters", 8, "--translator_filters.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 1e-3, "--translator_learning_rate.", lower_bound=0)
    flags.DEFINE_float("cycle_weight", 10.0, "--cycle_weight.", lower_bound=0)
    flags.DEFINE_float("identity_weight", 0.0, "--identity_weight.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Weights and batches.")
    flags.DEFINE_string("output", os.path.join(REPO, "benchmarks", "results",
                                               "translation.json"), "JSON results file.")


def _data():
    from uda_tf.data.paired import paired_slices
    from uda_tf.data.preprocess import PreprocessConfig
    pre = PreprocessConfig().to_manifest()
    n = FLAGS.subjects
    pair = lambda indices, slices: paired_slices(  # noqa: E731
        FLAGS.source_domain, FLAGS.target_domain, indices, pre, seed=FLAGS.seed,
        max_slices=slices)
    train_s, train_t = pair(range(n), 40), pair(range(n, 2 * n), 40)
    return train_s.source, train_t.reference, pair(range(1000, 1002), 24)


def _model(attention: bool, shape, class_names):
    import keras
    from uda_tf.methods.attent import AttENT
    from uda_tf.models.discriminators import entropy_discriminator
    from uda_tf.models.translators import patch_discriminator, translator
    from uda_tf.models.unet import residual_unet_2d
    keras.utils.set_random_seed(FLAGS.seed)
    settings = {"filters": FLAGS.filters, "depth": 2, "attention": attention}
    model = AttENT(
        residual_unet_2d(shape, len(class_names), base_filters=4, depth=2), class_names,
        translators={n: translator(shape, name=n, **settings) for n in ("g_st", "g_ts")},
        image_discs={n: patch_discriminator(shape, name=n) for n in ("d_s", "d_t")},
        entropy_disc=entropy_discriminator(shape[:-1] + (1,), patch=True),
        translation_epochs=10 ** 9, cycle_weight=FLAGS.cycle_weight,
        identity_weight=FLAGS.identity_weight, translator_learning_rate=FLAGS.learning_rate,
        translator_settings=settings, seed=FLAGS.seed)
    model.compile_from_config(model.Config(), _RunLike())
    return model


class _RunLike:
    """The run settings compile_from_config reads (constant learning rates)."""
    learning_rate, lr_schedule, lr_decay, warmup_steps = 1e-3, "constant", 0.0, 0
    epochs, steps_per_epoch, jit_compile = 1, 1, False


def _stream(x_s, x_t):
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(FLAGS.seed)
    b, shape = FLAGS.batch, x_s.shape[1:]

    def batches():
        while True:
            i, j = rng.integers(0, len(x_s), b), rng.integers(0, len(x_t), b)
            yield (x_s[i], np.zeros((b, *shape[:2]), np.uint8)), x_t[j]
    spec = ((tf.TensorSpec((b, *shape)), tf.TensorSpec((b, *shape[:2]), tf.uint8)),
            tf.TensorSpec((b, *shape)))
    return tf.data.Dataset.from_generator(batches, output_signature=spec)


def _scores(values: dict) -> dict:
    return {k: round(v, 4) for k, v in values.items() if k != "tissues"} | {
        "tissues": {t: round(v["translated"], 3) for t, v in values["tissues"].items()}}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    import numpy as np

    from uda_tf.data.phantom import LABELS
    from uda_tf.metrics import translation_fidelity
    names = {v: k for k, v in LABELS.items()}
    x_s, x_t, ev = _data()
    untranslated = translation_fidelity(ev.source, ev.reference, ev.labels, names)
    out = {"command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/translation.py "
                      + " ".join(argv[1:] + sys.argv[1:]),
           "settings": {k: FLAGS[k].value for k in (
               "source_domain", "target_domain", "steps", "every", "batch", "subjects",
               "filters", "learning_rate", "cycle_weight", "identity_weight", "seed")},
           "reference_tissue_means": {t: round(v["reference"], 3)
                                      for t, v in untranslated["tissues"].items()},
           "untranslated": _scores(untranslated), "variants": {}}
    for variant in FLAGS.variants:
        model = _model(VARIANTS[variant], x_s.shape[1:], list(names.values()))
        data, start, rows = _stream(x_s, x_t), time.time(), []
        for done in range(FLAGS.every, FLAGS.steps + 1, FLAGS.every):
            logs = model.fit(data, epochs=1, steps_per_epoch=FLAGS.every, verbose=0).history
            translated = np.concatenate([model.g_st(ev.source[i:i + 16]).numpy()
                                         for i in range(0, len(ev.source), 16)])
            row = {"step": done, "seconds": round(time.time() - start, 1),
                   **_scores(translation_fidelity(translated, ev.reference, ev.labels, names)),
                   **{k: round(float(logs[k][-1]), 4)
                      for k in ("g_adv", "cycle_loss", "d_img_acc")}}
            rows.append(row)
            print(f"{variant:9s} step {done:5d} {row['seconds']:7.0f}s  MAE {row['mae']:.3f}  "
                  f"SSIM {row['ssim']:.3f}  tissue error {row['tissue_contrast_error']:.3f}  "
                  f"{row['tissues']}  D acc {row['d_img_acc']:.2f}", flush=True)
        out["variants"][variant] = rows
    u = out["untranslated"]
    print(f"\nuntranslated: MAE {u['mae']:.3f}  SSIM {u['ssim']:.3f}  tissue error "
          f"{u['tissue_contrast_error']:.3f} {u['tissues']}; true target tissue means "
          f"{out['reference_tissue_means']}")
    print("| variant | steps | MAE | SSIM | tissue contrast error |\n|---|---|---|---|---|")
    print(f"| untranslated | – | {u['mae']:.3f} | {u['ssim']:.3f} | "
          f"{u['tissue_contrast_error']:.3f} |")
    for variant, rows in out["variants"].items():
        r = rows[-1]
        print(f"| {variant} | {r['step']} | {r['mae']:.3f} | {r['ssim']:.3f} | "
              f"{r['tissue_contrast_error']:.3f} |")
    from uda_tf.data.sharding import write_json_atomic
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    write_json_atomic(FLAGS.output, out)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
