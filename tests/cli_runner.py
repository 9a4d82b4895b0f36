"""Run a command line's `main` inside the test process, as `python -m <module> args...` would.

A CLI subprocess spends ~9 CPU-seconds importing TensorFlow, Keras and MLflow before it does
anything; the test process has them imported already. `run_cli("uda_tf.cli.prepare", [...])`
gives the CLI a clean set of absl flags (its own only, every one at its default), calls its
`run()` (what the console script calls), which answers `--help` or parses the arguments with
`absl.app.run` exactly as the console script does (flagfiles, validators, usage errors,
`sys.exit` codes; `sys.argv` is the command line) and returns what
`subprocess.run(..., capture_output=True, text=True)` would: `returncode`, `stdout`, `stderr`.

What this does not cover is the process boundary itself (the interpreter start, `__main__`,
console-script wrappers, signals): tests that are about it still start a real process
(tests/cli/test_train_cli.py, test_resume_cli.py, tests/data/test_prepare_cli.py, ...).
Not thread-safe: absl flags are global to the process, so one CLI runs at a time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import sys
import traceback
from unittest import mock

# absl.app and absl.logging define absl's own flags (--only_check_args, --verbosity, ...):
# imported before the base flags are taken.
from absl import app, flags  # noqa: F401
from absl import logging as absl_logging  # noqa: F401

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flags absl itself defines (--flagfile, --helpfull, logging flags...): kept across runs.
_BASE_FLAGS = frozenset(FLAGS)


@dataclasses.dataclass
class Completed:
    args: list
    returncode: int
    stdout: str
    stderr: str


def _forget_cli_flags():
    """Removes every flag a CLI defined, and the guards that make each CLI define its flags
    once per process, so the next CLI defines its own from scratch."""
    for name in set(FLAGS) - _BASE_FLAGS:
        delattr(FLAGS, name)
    from uda_tf.cli import prepare_flags, train
    train._NAMES.clear()
    prepare_flags._defined = False
    FLAGS.unparse_flags()


def run_cli(module: str, args, cwd=REPO) -> Completed:
    """`python -m <module> *args` run in `cwd` (the repository, where the subprocess tests
    ran their commands: configs/ paths resolve), in this process (module docstring)."""
    args = [str(a) for a in args]
    cli = importlib.import_module(module)
    _forget_cli_flags()
    out, err = io.StringIO(), io.StringIO()
    # absl's log handler holds the stderr of its creation: log records (warnings a user reads,
    # e.g. MLflow values kept for later) are copied into the captured stderr here.
    log_copy = logging.StreamHandler(err)
    log_copy.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log_copy)
    code = 0
    try:
        with (contextlib.chdir(cwd), contextlib.redirect_stdout(out),
              contextlib.redirect_stderr(err), mock.patch.object(sys, "argv", [module, *args])):
            try:
                cli.run()  # defines the flags, answers --help, app.run(main) on sys.argv
            except SystemExit as e:
                code = e.code
            except Exception:  # what the interpreter would print and exit 1 on
                traceback.print_exc()
                code = 1
    finally:
        logging.getLogger().removeHandler(log_copy)
        _forget_cli_flags()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed to stderr, status 1
        err.write(f"{code}\n")
        code = 1
    return Completed([module, *args], code, out.getvalue(), err.getvalue())
