"""`python -m uda_tf.cli.export` (uda-export): flags and main of exporting a checkpoint as a
SavedModel for TF Serving; the library is uda_tf.serving.export.
"""
from __future__ import annotations

import sys

import tensorflow as tf

from uda_tf.cli import entry
from uda_tf.serving.export import export_checkpoint


def define_flags():
    from absl import flags
    flags.DEFINE_string("checkpoint", None, "best.weights.h5 (with the run's config.json or "
                        "flags.cfg next to it), its checkpoints directory, or the run "
                        "directory.")
    flags.DEFINE_string("export_dir", None, "Export root: the SavedModel goes to "
                        "<export_dir>/<model_name>/<version> (default: <run_dir>/export).")
    flags.DEFINE_string("model_name", None, "Model name (default: the run's --model_name).")
    flags.DEFINE_integer("version", None, "Version directory (default: next free integer).",
                         lower_bound=1)
    flags.DEFINE_string("manifest", None, "manifest.json or prepared data directory (default: "
                        "next to the checkpoint, else the run's --data_dir).")
    flags.mark_flag_as_required("checkpoint")


def main(argv):
    from absl import flags, logging

    from uda_tf.files import OutputLockedError
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"export: error: unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # the SavedModel writer logs every file at INFO
    try:
        path = export_checkpoint(FLAGS.checkpoint, FLAGS.export_dir, FLAGS.model_name,
                                 FLAGS.version, FLAGS.manifest)
        loaded = tf.saved_model.load(path)
    except (ValueError, OSError, OutputLockedError, tf.errors.OpError) as e:
        # ValueError: bad names, flags, manifests, weights that do not fit; OSError: missing or
        # clashing files, a full disk; OutputLockedError: another export of the same model.
        raise SystemExit(f"export: error: {e}") from e
    print(f"SavedModel: {path}")
    print(f"signatures: {', '.join(sorted(loaded.signatures))}")


ABOUT = """Export a run's kept checkpoint as a versioned SavedModel for TF Serving
(<export_dir>/<model_name>/<version>).

example: python -m uda_tf.cli.export --checkpoint=runs/grl/checkpoints \\
           --export_dir=export/models --model_name=uda_demo"""


def run():
    entry.run(main, define_flags, ABOUT)


if __name__ == "__main__":
    sys.exit(run())
