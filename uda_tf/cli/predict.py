"""`python -m uda_tf.cli.predict` (uda-predict): flags and main of NIfTI prediction with an
exported model or a checkpoint; the library is uda_tf.evaluation.predict.
"""
from __future__ import annotations

import sys

from uda_tf.cli import entry
from uda_tf.cli.errors import reported_as
from uda_tf.evaluation.predict import (check_outputs, load_predictor, output_targets,
                                       predict_cases, protected_paths, resolve_inputs)


def define_flags():
    from absl import flags

    from uda_tf.data.layouts import LAYOUTS
    flags.DEFINE_string("model", None, "SavedModel directory (<name>/<version>) or a "
                        ".weights.h5 checkpoint.")
    flags.DEFINE_string("flags", None, "config.json or flags.cfg of the run, for a .weights.h5 "
                        "--model (default: the one next to the checkpoint).")
    flags.DEFINE_string("manifest", None, "manifest.json (or its directory) of the prepared "
                        "training data (default: the SavedModel's assets.extra/manifest.json, "
                        "or next to the checkpoint).")
    flags.DEFINE_list("input", [], "NIfTI files or glob patterns to predict.")
    flags.DEFINE_enum("layout", None, sorted(LAYOUTS), "Raw dataset layout to read with "
                      "--input_dir instead of --input (every case is predicted).")
    flags.DEFINE_string("input_dir", None, "Raw dataset directory for --layout.")
    from uda_tf.cli.prepare_flags import define_layout_option_flags
    define_layout_option_flags()  # --image_glob ... as prepare takes them
    flags.DEFINE_string("output_dir", None, "Where <case>.nii.gz predictions go.")
    flags.DEFINE_bool("overwrite_input_files", False, "Allow --output_dir to be the folder of "
                      "the --input scans, or to be (or lie inside) a folder of a dataset's "
                      "scans or labels (imagesTr, labelsTr, ... of --input_dir or of the "
                      "inputs' dataset), where predictions <case>.nii.gz may replace input "
                      "scans or ground truth. Off: such an --output_dir is refused before "
                      "anything is predicted.")
    flags.DEFINE_bool("save_probabilities", False, "Also write <case>_probabilities.nii.gz.")
    flags.DEFINE_bool("save_entropy", False, "Also write <case>_entropy.nii.gz.")
    flags.DEFINE_string("save_translation", None, "Also write <case>_translated.nii.gz: this "
                        "output of the SavedModel's translate signature (to_target or "
                        "to_source, exported by --method=attent), in the prepared data's "
                        "normalised intensities, on the scan's grid. 2D models.")
    flags.DEFINE_bool("tta", False, "Average over flips of every spatial axis (test-time "
                      "augmentation: 4x the work in 2D, 8x in 3D).")
    flags.DEFINE_integer("batch_size", 32, "Slices (2D) or patches (3D) per model call.",
                         lower_bound=1)
    flags.DEFINE_float("overlap", 0.5, "3D sliding window: overlap of neighbouring patches, "
                       "as a fraction of the patch size.", lower_bound=0.0, upper_bound=0.95)
    flags.DEFINE_list("patch_size", None, "3D sliding window patch size h,w,d (default: the "
                      "model's fixed input size).")
    flags.mark_flags_as_required(["model", "output_dir"])


def main(argv):
    from absl import flags, logging
    from uda_tf.cli.prepare_flags import layout_options_from_flags
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"predict: error: unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    if bool(FLAGS.layout) != bool(FLAGS.input_dir):
        raise SystemExit("predict: error: --layout and --input_dir go together")
    if bool(FLAGS.input) == bool(FLAGS.input_dir):
        raise SystemExit("predict: error: pass either --input=<files or globs> or --layout with "
                         "--input_dir")
    # ValueError: NiftiError, LayoutError, bad names, a model that does not fit the data;
    # OSError: missing files, a full disk; RuntimeError: OutputLockedError.
    with reported_as("predict", f"predicting with --model={FLAGS.model}"):
        patch = None if not FLAGS.patch_size else [int(p) for p in FLAGS.patch_size]
        options = layout_options_from_flags()
        if options and not FLAGS.layout:
            raise ValueError(f"--{sorted(options)[0]} is a layout option: it needs --layout "
                             "with --input_dir")
        cases = resolve_inputs(FLAGS.input, FLAGS.layout, FLAGS.input_dir, options)
        # Where the outputs go is checked before the model is loaded (seconds) and before
        # anything is predicted; predict_cases checks again (a library call has no main).
        check_outputs(output_targets(cases, FLAGS.output_dir,
                                     save_probabilities=FLAGS.save_probabilities,
                                     save_entropy=FLAGS.save_entropy,
                                     save_translation=bool(FLAGS.save_translation)),
                      FLAGS.output_dir,
                      protected_paths(cases, FLAGS.layout, FLAGS.input_dir, options),
                      overwrite_input_files=FLAGS.overwrite_input_files)
        predictor = load_predictor(FLAGS.model, manifest=FLAGS.manifest, flags_path=FLAGS.flags,
                                   tta=FLAGS.tta, batch_size=FLAGS.batch_size,
                                   patch_size=patch, overlap=FLAGS.overlap,
                                   translation=FLAGS.save_translation)
        predict_cases(predictor, cases, FLAGS.output_dir,
                      save_probabilities=FLAGS.save_probabilities,
                      save_entropy=FLAGS.save_entropy, layout=FLAGS.layout,
                      input_dir=FLAGS.input_dir, layout_options=options,
                      overwrite_input_files=FLAGS.overwrite_input_files)
    print(f"wrote {len(cases)} prediction(s) to {FLAGS.output_dir}")


# --help's groups (title, first flag); the flags are defined in this order.
HELP_SECTIONS = (("model", "model"), ("input", "input"),
                 ("layout options (only where the layout takes them)", "image_glob"),
                 ("output", "output_dir"), ("inference", "tta"))


ABOUT = """Segment NIfTI scans with an exported model (or a run's checkpoints): one label map
per input, with the input's shape, affine and orientation, written under --output_dir.

example: python -m uda_tf.cli.predict --model=runs/grl/export/uda_segmentor/1 \\
           --input=scan.nii.gz --output_dir=predictions"""


def run():
    entry.run(main, define_flags, ABOUT, sections=HELP_SECTIONS)


if __name__ == "__main__":
    sys.exit(run())
