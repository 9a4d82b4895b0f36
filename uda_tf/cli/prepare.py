"""`python -m uda_tf.cli.prepare` (uda-prepare): raw scans -> TFRecord shards + manifest.json.
Flags are in cli/prepare_flags.py; the library is uda_tf.data.prepare.
"""
from __future__ import annotations

import sys

from absl import app

from uda_tf.data.prepare import prepare


def main(argv) -> None:
    from uda_tf.cli import prepare_flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        prepare(**prepare_flags.prepare_kwargs())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        sys.exit(1)


def define_flags() -> None:
    """Defines the CLI flags (on first call only); see uda_tf/cli/prepare_flags.py."""
    from uda_tf.cli import prepare_flags

    prepare_flags.define_flags()


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
