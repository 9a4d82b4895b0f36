"""`python -m uda_tf.cli.replay_mlflow --replay=<run_dir>/mlflow_unsent.json`: send what a run
could not send to MLflow (uda_tf.training.tracking.replay_unsent).
"""
from __future__ import annotations

import os
import sys

from uda_tf.cli import entry
from uda_tf.training.tracking import UnsentFileError, replay_unsent, set_http_defaults


def main(argv):
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) > 1 or not FLAGS.replay:
        raise SystemExit("usage: python -m uda_tf.cli.replay_mlflow "
                         "--replay=<run_dir>/mlflow_unsent.json [--tracking_uri=...]")
    if not os.path.isfile(FLAGS.replay):
        raise SystemExit(f"--replay={FLAGS.replay}: no such file")
    set_http_defaults()
    try:
        replay_unsent(FLAGS.replay, FLAGS.tracking_uri or None)
    except (RuntimeError, UnsentFileError) as e:
        raise SystemExit(f"tracking: error: {e}") from None
    print(f"sent {FLAGS.replay} to MLflow and removed it")


def define_flags():
    from absl import flags
    flags.DEFINE_string("replay", None, "mlflow_unsent.json to send.")
    flags.DEFINE_string("tracking_uri", "", "Send to this tracking URI instead of the saved one.")


ABOUT = """Send to MLflow what a run could not send (the run kept it in
<run_dir>/mlflow_unsent.json), then remove that file.

example: python -m uda_tf.cli.replay_mlflow --replay=runs/grl/mlflow_unsent.json"""


def run():
    entry.run(main, define_flags, ABOUT)


if __name__ == "__main__":
    sys.exit(run())
