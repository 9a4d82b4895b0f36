"""`python -m uda_tf.cli.evaluate` (uda-evaluate): flags and main of volume evaluation; the
library is uda_tf.evaluation.evaluate, whose docstring says what is written.
"""
from __future__ import annotations

import os
import sys

from uda_tf.cli import entry
from uda_tf import metrics
from uda_tf.cli.errors import reported_as
from uda_tf.evaluation.evaluate import (evaluate_model, evaluate_niftis, log_to_mlflow,
                                        saved_model_predictor, verify_split_shards)


def _print_summary(summary, output_dir):
    def show(stats):
        return "   n/a" if stats["mean"] is None else f"{stats['mean']:6.3f}"

    print(f"{'class':>12s}  {'dice':>6s}  {'sDice':>6s}  {'ASSD':>6s}  {'HD95':>6s}  n")
    for name, stats in [*summary["classes"].items(), ("foreground", summary["foreground"])]:
        print(f"{name:>12s}  {show(stats['dice'])}  {show(stats['surface_dice'])}  "
              f"{show(stats['assd'])}  {show(stats['hd95'])}  {stats['dice']['n']}")
    print(f"surface Dice at {summary['surface_dice_tolerance_mm']:g} mm, distances in mm "
          f"({summary['distance_convention']}); wrote {output_dir}/metrics.csv, summary.json")


def main(argv):
    from absl import flags, logging
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"evaluate: error: unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    prepared = [f for f in ("data_dir", "domain", "model") if FLAGS[f].value]
    nifti = [f for f in ("predictions", "labels") if FLAGS[f].value]
    if bool(prepared) == bool(nifti) or (prepared and len(prepared) < 3) or len(nifti) == 1:
        raise SystemExit("evaluate: error: pass either --data_dir, --domain and --model (a "
                         "model on a prepared split) or --predictions and --labels (NIfTI "
                         "directories)")
    if bool(FLAGS.mlflow_run_id) and not FLAGS.mlflow_tracking_uri:
        raise SystemExit("evaluate: error: --mlflow_run_id needs --mlflow_tracking_uri")
    options = {"tolerance_mm": FLAGS.tolerance_mm, "convention": FLAGS.distance_convention,
               "cap_mm": FLAGS.distance_cap_mm or None, "figures": FLAGS.figures,
               "oracle": FLAGS.oracle}
    # ValueError: bad flags, manifests, ShardCorruptedError, SignatureError,
    # ModelInputError, clashing case files; OSError: missing files. A TensorFlow error:
    # e.g. a shard damaged after the sha256 check or with --nocheck_shards.
    with reported_as("evaluate", f"evaluating {FLAGS.model or FLAGS.predictions} on "
                                 f"{FLAGS.data_dir or FLAGS.labels}"):
        if prepared:
            from uda_tf.data.manifest import load_manifest
            manifest = load_manifest(FLAGS.data_dir)
            if FLAGS.domain not in manifest.domains:
                raise ValueError(f"--domain={FLAGS.domain!r} is not in {FLAGS.data_dir}; "
                                 f"domains there: {sorted(manifest.domains)}")
            if not os.path.isfile(os.path.join(FLAGS.model, "saved_model.pb")):
                raise ValueError(f"--model={FLAGS.model!r}: no SavedModel directory there")
            if FLAGS.check_shards:
                verify_split_shards(manifest, FLAGS.data_dir, FLAGS.domain, FLAGS.split)
            predict_fn = saved_model_predictor(FLAGS.model, tta=FLAGS.tta, manifest=manifest,
                                               data=f"--data_dir={FLAGS.data_dir}")
            summary = evaluate_model(predict_fn, FLAGS.data_dir, manifest, FLAGS.domain,
                                     FLAGS.split, FLAGS.output_dir, batch_size=FLAGS.batch_size,
                                     **options)
        else:
            names = None
            if FLAGS.manifest:
                from uda_tf.evaluation.predict import _load_manifest
                names = _load_manifest(FLAGS.manifest, "--manifest").label_names
            summary = evaluate_niftis(FLAGS.predictions, FLAGS.labels, FLAGS.output_dir,
                                      label_names=names, images_dir=FLAGS.images, **options)
        if FLAGS.mlflow_run_id:
            log_to_mlflow(FLAGS.output_dir, FLAGS.mlflow_run_id, FLAGS.mlflow_tracking_uri,
                          FLAGS.mlflow_artifact_path)
    _print_summary(summary, FLAGS.output_dir)


def define_flags():
    from absl import flags
    flags.DEFINE_string("data_dir", None, "Prepared dataset (directory with manifest.json).")
    flags.DEFINE_string("domain", None, "Domain to evaluate.")
    flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to evaluate.")
    flags.DEFINE_string("model", None, "SavedModel directory (<name>/<version>).")
    flags.DEFINE_integer("batch_size", 32, "Slices per model call.", lower_bound=1)
    flags.DEFINE_bool("tta", False, "Average the model over flips (test-time augmentation).")
    flags.DEFINE_bool("check_shards", True, "Check the sha256 of every shard of --domain/"
                      "--split against the manifest before evaluating (as train does); a "
                      "damaged shard is named instead of failing mid-run.")
    flags.DEFINE_string("predictions", None, "Directory of NIfTI predictions <case>.nii.gz "
                        "(python -m uda_tf.cli.predict).")
    flags.DEFINE_string("labels", None, "Directory of NIfTI labels <case>.nii.gz on the same "
                        "grids (e.g. labelsTr of an MSD/nnU-Net dataset).")
    flags.DEFINE_string("images", None, "Directory of the scans (<case>_0000.nii.gz), shown "
                        "in the overlays of --predictions.")
    flags.DEFINE_string("manifest", None, "manifest.json (or its directory) naming the classes "
                        "of --predictions (default: the label values found).")
    flags.DEFINE_string("output_dir", None, "Where metrics.csv, summary.json and figures go.")
    flags.DEFINE_float("tolerance_mm", metrics.DEFAULT_TOLERANCE_MM,
                       "Surface Dice tolerance in mm.", lower_bound=0.0)
    flags.DEFINE_enum("distance_convention", "medpy", list(metrics.CONVENTIONS),
                      "HD95/ASSD definition: medpy (boundary voxels) or deepmind (surfels).")
    flags.DEFINE_float("distance_cap_mm", metrics.DEFAULT_CAP_MM, "ASSD/HD95 cap in mm, also "
                       "the value when a class is missing from the prediction or the label "
                       "(0: no cap).", lower_bound=0.0)
    flags.DEFINE_bool("figures", True, "Write boxplot.png and overlays/<case>.png.")
    flags.DEFINE_bool("oracle", False, "Mark the numbers as computed from target-domain "
                      "labels (reported, never used for model selection).")
    flags.DEFINE_string("mlflow_run_id", None, "Log the outputs as artifacts of this run.")
    flags.DEFINE_string("mlflow_tracking_uri", None, "Tracking URI of --mlflow_run_id.")
    flags.DEFINE_string("mlflow_artifact_path", "evaluation", "Artifact directory in the run.")
    flags.mark_flag_as_required("output_dir")


# --help's groups (title, first flag); the flags are defined in this order.
HELP_SECTIONS = (("a model on a prepared test split", "data_dir"),
                 ("NIfTI predictions against NIfTI labels", "predictions"),
                 ("output and metrics", "output_dir"), ("tracking", "mlflow_run_id"))


ABOUT = """Score segmentations against labels per case and per foreground class (Dice,
surface distances, volumes): either an exported model on a prepared test split
(--data_dir, --domain, --model) or NIfTI predictions against NIfTI labels
(--predictions, --labels). Writes metrics.csv and summary.json under --output_dir.

example: python -m uda_tf.cli.evaluate --data_dir=prepared --domain=siteB \\
           --model=runs/grl/export/uda_segmentor/1 --output_dir=eval_grl"""


def run():
    entry.run(main, define_flags, ABOUT, sections=HELP_SECTIONS)


if __name__ == "__main__":
    sys.exit(run())
