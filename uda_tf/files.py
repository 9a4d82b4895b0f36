"""What uda_tf may write where: names that stay names, one writer per output directory, and
removal only of directories uda_tf made.

Three rules every command follows (issue: "no way to lose a user's files"):

* A name a user gives (run, model, case) is a single path component. `check_name` refuses
  separators, `..`, absolute paths and control characters, naming the flag, before anything is
  created; `inside` checks that a joined path did not leave its root anyway.
* One writer per output: `OutputLock` takes an advisory `flock` on `<dir>/.uda_tf.lock` and
  writes its holder (pid, host, command, time) into it; a second writer is refused with a
  message naming that holder. The kernel drops the lock when the holder dies, so a crash leaves
  no stale lock to clean by hand.
* `--overwrite` removes only what uda_tf made: a directory it creates gets a marker file
  (`mark_created`), and `remove_created` refuses a directory without one.

And every file is written whole or not at all: `atomic_write` writes under a temporary name
beside the target, then renames it over the target, so a reader (or a crash) finds the old file
or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys

LOCK_FILE = ".uda_tf.lock"
MARKER_FILE = ".uda_tf_created"


class BadNameError(ValueError):
    """A user-given name that is not a plain name."""


class OutputLockedError(RuntimeError):
    """Another process is writing the same output directory."""


class NotOurDirectoryError(RuntimeError):
    """`--overwrite` asked to remove a directory uda_tf did not create."""


def check_name(value: str, flag: str, *, what: str = "name") -> str:
    """`value` if it is one plain path component, else ValueError naming `flag`.

    Names become directory or file names under a root the user chose elsewhere (a run under
    --output_dir, a model under --export_dir, a case's prediction under --output_dir); a
    separator or `..` would let them land anywhere.
    """
    text = str(value)
    problem = None
    if not text:
        problem = "it is empty"
    elif text in (".", ".."):
        problem = f"{text!r} is a directory reference"
    elif os.sep in text or (os.altsep and os.altsep in text) or "\\" in text:
        problem = "it contains a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        problem = "it contains control characters"
    elif text.startswith("-"):
        problem = "it starts with '-'"
    if problem:
        raise BadNameError(f"{flag}={value!r} must be a plain {what} (no '/', '\\', '..' or "
                         f"absolute path), but {problem}")
    return text


def add_unique(found: dict, case_id: str, item, clash) -> None:
    """Records `case_id` -> `item` in `found`. Two different items under one case id would
    silently keep only the last (one scan's prediction written over another's, a label scored
    against the wrong scan), so that is `clash(first, item)`, the exception naming both; the
    same item twice is kept once."""
    if case_id in found and found[case_id] != item:
        raise clash(found[case_id], item)
    found[case_id] = item


def inside(root: str, path: str, flag: str) -> str:
    """`path` if it resolves (symlinks followed) to somewhere inside `root`, else ValueError."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise BadNameError(f"{flag}: {path} resolves to {real}, outside {real_root}")
    return path


def same_or_inside(path: str, root: str) -> bool:
    """True when `path` is `root` or lies under it (both resolved)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


# --- whole files or none ------------------------------------------------------------------

# `.<stem>.partial-<pid><extension>`: hidden, so listings of a directory skip it; the pid, so
# two processes writing the same target do not share one temporary; the extension last, so
# libraries that choose the format by it (nibabel, matplotlib, Keras' `.weights.h5`) still do.
_PARTIAL = re.compile(r"^\.(?P<stem>[^.][^.]*)\.partial-\d+(?P<extension>\..*)?$")


def partial_path(path: str) -> str:
    """The temporary name `atomic_write` writes `path` under, in the same directory (so the
    rename stays on one file system). The extension is everything from the name's first dot:
    `.nii.gz` and `.weights.h5` stay whole."""
    directory, name = os.path.split(os.fspath(path))
    stem, dot, extension = name.partition(".")
    if not stem:  # a hidden name: its extension starts at the next dot
        stem, dot, extension = name[1:].partition(".")
        stem = "_" + stem
    return os.path.join(directory, f".{stem}.partial-{os.getpid()}{dot}{extension}")


def is_partial(name: str) -> bool:
    """True for a file name `partial_path` makes (left behind by a process that was killed)."""
    return bool(_PARTIAL.match(os.path.basename(name)))


@contextlib.contextmanager
def atomic_write(path: str, mode: str | None = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None):
    """Writes `path` whole or not at all.

    With `mode` "w"/"wb" yields a file object on the temporary name, synced to disk before
    the rename; with `mode=None` yields the temporary path, for writers that open the file
    themselves (nibabel, matplotlib, Keras' save_weights). On success the temporary replaces
    `path`; on any failure (an exception, Ctrl-C) it is removed and `path` stays as it was.
    """
    tmp = partial_path(path)
    try:
        if mode is None:
            yield tmp
        else:
            binary = "b" in mode
            with open(tmp, mode, encoding=None if binary else encoding,
                      newline=None if binary else newline) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_json(path: str, value, **options) -> None:
    """`value` as JSON in `path`, atomically, with a final newline; `options` go to json.dump
    (indent, sort_keys, allow_nan)."""
    with atomic_write(path) as f:
        json.dump(value, f, **options)
        f.write("\n")


# --- ownership markers ----------------------------------------------------------------------

def mark_created(directory: str, kind: str) -> None:
    """Records that uda_tf created `directory` (a run, a prepared dataset, ...)."""
    with open(os.path.join(directory, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump({"created_by": "uda_tf", "kind": kind,
                   "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
        f.write("\n")


def created_by_us(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER_FILE))


def check_created(directory: str, flag: str = "--overwrite", other: str = "name") -> None:
    """NotOurDirectoryError unless `directory` is a real directory uda_tf created (its marker
    file is there): what `flag` checks before it removes or empties anything. `other` is what
    the user may choose instead (a name, a --run_name)."""
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise NotOurDirectoryError(f"{flag}: {directory} is not a directory uda_tf created "
                                   "(a link or a file); nothing was removed")
    if not created_by_us(directory):
        raise NotOurDirectoryError(
            f"{flag} refuses to remove {directory}: it was not created by uda_tf (no "
            f"{MARKER_FILE} in it); nothing was removed. Move it away or choose another "
            f"{other}.")


def remove_created(directory: str, flag: str = "--overwrite") -> None:
    """Removes `directory` only if uda_tf created it (its marker file is there)."""
    check_created(directory, flag)
    shutil.rmtree(directory)


# --- one writer per output ------------------------------------------------------------------

def _holder_text() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:300],
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def describe_holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                f"({holder.get('command')})")
    except (OSError, ValueError, AttributeError):
        return "another process"


class OutputLock:
    """Exclusive advisory lock on an output directory, held while a command writes it.

        with OutputLock(out_dir, "prepare --output_dir"):
            ...write...

    Refuses at once (no waiting) with OutputLockedError naming the holder. Re-entrant within
    one process: a second OutputLock on a directory this process already holds is a no-op, so
    library calls that lock (prepare() from the demo) nest inside CLIs that lock.
    """

    _held: dict[str, int] = {}  # realpath -> nesting depth, this process

    def __init__(self, directory: str, what: str):
        self.directory = directory
        self.what = what
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd = None
        self._key = None

    def acquire(self) -> "OutputLock":
        os.makedirs(self.directory, exist_ok=True)
        self._key = os.path.realpath(self.directory)
        if self._key in OutputLock._held:
            OutputLock._held[self._key] += 1
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise OutputLockedError(
                    f"{self.what}: {self.directory} is being written by "
                    f"{describe_holder(self.path)}; wait for it to finish or choose another "
                    "directory") from None
            # The holder before us may have removed the file between our open and our lock:
            # then we hold a lock on a deleted inode; start again on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder_text()) + "\n").encode("utf-8"))
        self._fd = fd
        OutputLock._held[self._key] = 1
        return self

    def release(self) -> None:
        if self._key is None or self._key not in OutputLock._held:
            return
        OutputLock._held[self._key] -= 1
        if OutputLock._held[self._key] > 0:
            return
        del OutputLock._held[self._key]
        if self._fd is not None:
            try:
                os.remove(self.path)  # while still locked, so no one else holds this inode
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
