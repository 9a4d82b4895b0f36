"""How a command line reports a known condition: `<prog>: error: <message>`, exit 1.

Known conditions are the exceptions uda_tf raises with a message that names the file, flag or
value (ValueError and its kin: NiftiError, LayoutError, ManifestError, BadNameError, ...;
OSError: missing files, a full disk; RuntimeError: OutputLockedError and other refusals) and
TensorFlow's OpErrors, whose first line names the op. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def reported_as(prog: str, doing: str):
    """Turns known conditions raised inside into SystemExit("<prog>: error: ...").

    `doing` says what ran when a TensorFlow error came, e.g. "predicting with --model=m":
    an OpError names an op, not the user's file or flag.
    """
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"{prog}: error: {e}") from e
    except Exception as e:  # noqa: BLE001
        tf = sys.modules.get("tensorflow")  # not loaded: it cannot be a TensorFlow error
        if tf is None or not isinstance(e, tf.errors.OpError):
            raise
        first = (e.message or str(e)).splitlines()[0]
        raise SystemExit(f"{prog}: error: TensorFlow {type(e).__name__} while {doing}: "
                         f"{first}") from e
