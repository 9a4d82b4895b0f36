"""`python -m uda_tf.cli.replay_mlflow --replay=<run_dir>/mlflow_unsent.json`: send what a run
could not send to MLflow (uda_tf.training.tracking.replay_unsent).
"""
from __future__ import annotations

import os
import sys

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


def run():
    from absl import app, flags
    flags.DEFINE_string("replay", None, "mlflow_unsent.json to send.")
    flags.DEFINE_string("tracking_uri", "", "Send to this tracking URI instead of the saved one.")
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
