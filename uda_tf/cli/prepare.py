"""`python -m uda_tf.cli.prepare` (uda-prepare): raw scans -> TFRecord shards + manifest.json.
Flags are in cli/prepare_flags.py; the library is uda_tf.data.prepare.
"""
from __future__ import annotations

import sys

from absl import app

from uda_tf.cli import entry
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


# --help's groups (title, first flag); the flags are defined in this order.
HELP_SECTIONS = (("input", "layout"), ("layout options (only where the layout takes them)",
                 "image_glob"), ("preprocessing", "spacing"), ("output", "output"),
                 ("privacy and limits", "keep_identifiers"))


ABOUT = """Convert a raw dataset into what train.py reads: reorient, resample, normalise and
write TFRecord shards with a manifest.json. --layout names how the files are laid out
(cc359, crossmoda, msd for MSD and nnU-Net v1/v2, drive, stare, or glob for your own
files); nothing under --input_dir is changed.

example: python -m uda_tf.cli.prepare --layout=msd --input_dir=/data/Task04_Hippocampus \\
           --output_dir=/data/prepared"""


def run():
    entry.run(main, define_flags, ABOUT, sections=HELP_SECTIONS)


if __name__ == "__main__":
    run()
