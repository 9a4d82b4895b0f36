"""Guards around training: divergence (non-finite losses or gradients), gradient norms as
metrics, and output directories that cannot be written.

`keras.callbacks.TerminateOnNaN` stops on a NaN `loss` but says neither which term nor that a
gradient blew up, and methods here report several terms (`seg_loss`, `domain_loss`, ...) and
no `loss`. `DivergenceGuard` checks every logged term and the gradient norm of every
optimizer after each step (recorded by the method's `apply_update` in its train_step:
`SegmentationMethod.gradient_norms`); it stops naming them (`--on_divergence=stop`) or rolls
back to the newest backup and goes on (`--on_divergence=rollback`): weights and optimizer states return to
that backup, the data stream does not rewind, so the batches since the backup (the bad one
among them) are skipped; the learning rate is left alone (a single bad batch, the common
cause, needs no smaller steps; a run that diverges again and again stops after
`max_rollbacks`).
"""
from __future__ import annotations

import math
import os
import uuid

import keras
import tensorflow as tf


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss term or gradient; the message names them."""


class DivergenceGuard(keras.callbacks.Callback):
    """Checks each step's logged terms and gradient norms; adds the epoch's mean gradient
    norm per optimizer to the epoch logs as `grad_norm/<optimizer>` (so place it before the
    loggers). `grad_norms()` returns {optimizer: norm of its last step's gradients} (a
    method's `gradient_norms`); `backup` (a resume.TrainingBackup) gives the global step and
    the rollback."""

    POLICIES = ("stop", "rollback")

    def __init__(self, grad_norms, *, policy: str = "stop", backup=None,
                 max_rollbacks: int = 3):
        super().__init__()
        if policy not in self.POLICIES:
            raise ValueError(f"--on_divergence must be one of {', '.join(self.POLICIES)}, "
                             f"got {policy!r}")
        if policy == "rollback" and backup is None:
            raise ValueError("--on_divergence=rollback needs training backups")
        self.grad_norms, self.policy, self.backup = grad_norms, policy, backup
        self.max_rollbacks = int(max_rollbacks)
        self.rollbacks: list[dict] = []
        self._steps = 0
        self._epoch = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._resumed = None

    def _global_step(self) -> int:
        return self.backup.batches if self.backup is not None else self._steps

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._resumed is not None:  # the epoch a backup interrupted: its sums go on
            self._sums, self._counts = self._resumed
            self._resumed = None
            return
        self._sums = {n: 0.0 for n in self.grad_norms()}
        self._counts = {n: 0 for n in self.grad_norms()}

    # Travels with the training backup (resume.py), so a resumed epoch's mean gradient norm
    # covers the steps before the crash too.
    def backup_state(self) -> dict:
        return {"sums": self._sums, "counts": self._counts, "rollbacks": self.rollbacks}

    def restore_state(self, state: dict) -> None:
        self._resumed = (dict(state["sums"]), dict(state["counts"]))
        self.rollbacks = list(state["rollbacks"])

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        values = {k: float(v) for k, v in (logs or {}).items() if _is_scalar(v)}
        norms = self.grad_norms()
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        bad.update({f"grad_norm/{n}": v for n, v in norms.items() if not math.isfinite(v)})
        if not bad:
            for n, v in norms.items():
                self._sums[n] = self._sums.get(n, 0.0) + v
                self._counts[n] = self._counts.get(n, 0) + 1
            return
        # The global step counts this batch (the backup callback, later in the list, has not
        # seen it yet): step k is the k-th batch of the run, from 1.
        step = self._global_step() + (1 if self.backup is not None else 0)
        terms = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        where = f"step {step} (epoch {self._epoch}, batch {batch})"
        if self.policy == "stop" or len(self.rollbacks) >= self.max_rollbacks:
            extra = (f" after {len(self.rollbacks)} rollbacks (--max_rollbacks="
                     f"{self.max_rollbacks})" if self.policy == "rollback"
                     else "; --on_divergence=rollback goes back to the last backup and skips "
                     "the batch instead")
            raise DivergenceError(f"training diverged at {where}: non-finite {terms}; "
                                  f"stopped{extra}")
        path = self.backup.rollback()
        self.rollbacks.append({"step": step, "terms": sorted(bad), "backup": path})
        tf.get_logger().warning("training diverged at %s: non-finite %s; rolled back to %s "
                                "and skipped the batches since", where, terms, path)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for n in self._counts:
            if self._counts.get(n):
                logs[f"grad_norm/{n}"] = self._sums[n] / self._counts[n]
        if self.rollbacks:
            logs["rollbacks"] = float(len(self.rollbacks))


def _is_scalar(v) -> bool:
    try:
        return int(getattr(v, "size", 1)) == 1
    except TypeError:
        return False


def check_writable(directory: str, flag: str) -> None:
    """Creates `directory` if needed and writes, then removes, a probe file in it; an
    OSError becomes a message naming the flag, the directory and the reason, before any
    training starts."""
    probe = os.path.join(directory, f".write-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"{flag}={directory} is not writable: {e.strerror or e}; "
                      "nothing was trained") from e
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def ensure_space(path: str, nbytes: int, what: str) -> None:
    """Refuses a write of about `nbytes` to `path` that cannot fit: free space on its file
    system, or the per-file size limit (RLIMIT_FSIZE). Checked first because HDF5, under
    Keras' `save_weights`, can crash the process (SIGSEGV) when a write fails mid-file
    instead of raising; a disk that fills during the write is still that risk."""
    import resource
    import shutil

    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    free = shutil.disk_usage(directory).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    room = free if soft == resource.RLIM_INFINITY else min(free, soft)
    if nbytes > room:
        raise OSError(28, f"no room for {what} {path}: needs about {nbytes} bytes, "
                      f"{room} available ({'file size limit' if room < free else 'disk full'})")


def weights_file_size(variables) -> int:
    """A generous estimate of a .weights.h5 file: the values plus HDF5's per-dataset
    headers."""
    return int(sum(v.numpy().nbytes for v in variables) * 1.1) + 4096 * len(variables) + 65536
