"""Crash and resume: a backup of the whole training state, and fitting from one.

Keras' own `BackupAndRestore` is not enough here (checked in Keras 3.15): it saves
`model.save_weights` and the epoch only, so a method's second optimizer (`disc_optimizer`)
is lost, a backup taken every N steps restores to the *start* of its epoch, and the weights
and metadata files are written in place, so a kill between the two leaves a torn pair.

A backup is a directory `<run_dir>/backup/step-<batches:09d>/` with

* `variables.npz`: every variable, by group: `model` (all sub-networks' weights and
  non-trainable state: norm statistics, seed-generator states), `optimizer/<label>` for
  every optimizer in the method's `optimizers` dict (`seg_optimizer`, `disc_optimizer`,
  ...; their `iterations` drive the lambda schedules, so the schedule state comes with them) and
  `metrics` (running means of the epoch in progress);
* `state.json`: epoch, step within the epoch, batches consumed from the training stream, the
  state of callbacks that keep some (the best checkpoint's `best`, the learning-curve
  history), the flags the run was started with.

It is written under a temporary name and renamed into place, so a directory named `step-*`
is always complete; the newest two are kept (the older one is the fallback if the newest
cannot be read, and the "last good" state a divergence rollback returns to).

Resuming a run mid-epoch needs a shorter first epoch, which `Model.fit` cannot do with a
fixed `steps_per_epoch`: `fit_from_backup` runs the rest of the interrupted epoch as its own
`fit` call, then the remaining epochs. The training stream restarts with each `fit`, so
`make_train_ds(batches)` must return the stream positioned after `batches` batches:
with `--deterministic` (op determinism on) the same stream with `.skip(batches)`, which
reproduces every shuffle and augmentation draw of an uninterrupted run; otherwise a stream
re-seeded with the position (no replay cost, statistically the same training).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile

import keras
import numpy as np
from absl import logging

BACKUP_DIR = "backup"
_NAME = re.compile(r"^step-(\d{9})$")
KEEP = 2
# Flags that may change between a crash and its resume without invalidating the backup:
# where things go and how they are reported, not what is trained.
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "output_dir", "run_name", "data_dir", "dataset_source",
    "mlflow_tracking_uri", "mlflow_experiment", "register_model_name", "register_alias",
    "mlflow_sample_slices", "backup_every_steps", "on_divergence", "max_rollbacks",
    "num_cpu_devices", "model_name", "check_shards",
})


class BackupError(RuntimeError):
    """A backup could not be written or read; the message says which and what was kept."""


def optimizers(model) -> dict[str, keras.optimizers.Optimizer]:
    """Every optimizer a method holds (its `optimizers` dict, which `compile` fills), by
    label (`seg_optimizer`, `disc_optimizer`, ...), sorted: the backup's group names. A plain
    Keras model has its one `optimizer`."""
    if hasattr(model, "optimizer_label"):
        found = {model.optimizer_label(n): opt for n, opt in model.optimizers.items()}
    else:
        found = {"optimizer": model.optimizer}
    return dict(sorted(found.items()))


def state_groups(model) -> dict[str, list]:
    """{group: [variables]} in a fixed order (see the module docstring)."""
    metric_vars = [v for m in model.metrics for v in m.variables]
    metric_ids = {id(v) for v in metric_vars}
    groups = {"model": [v for v in model.variables if id(v) not in metric_ids]}
    for name, opt in optimizers(model).items():
        groups[f"optimizer/{name}"] = list(opt.variables)
    groups["metrics"] = metric_vars
    return groups


def _key(group: str, i: int) -> str:
    return f"{group.replace('/', '.')}.{i:05d}"


def list_backups(backup_dir: str) -> list[str]:
    """Complete backups, oldest first."""
    if not os.path.isdir(backup_dir):
        return []
    names = sorted(n for n in os.listdir(backup_dir) if _NAME.match(n))
    return [os.path.join(backup_dir, n) for n in names]


def write_backup(backup_dir: str, groups: dict, state: dict, keep: int = KEEP) -> str:
    """Writes one backup atomically; returns its directory. On failure (a full disk, say)
    removes the partial copy and raises BackupError naming what is still there."""
    final = os.path.join(backup_dir, f"step-{int(state['batches']):09d}")
    tmp = os.path.join(backup_dir, f".{os.path.basename(final)}.partial-{os.getpid()}")
    arrays = {_key(g, i): np.asarray(v.numpy()) for g, vs in groups.items()
              for i, v in enumerate(vs)}
    meta = dict(state, groups={g: len(vs) for g, vs in groups.items()})
    try:
        os.makedirs(backup_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "variables.npz"), "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again (e.g. after a rollback)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [b for b in list_backups(backup_dir) if b != final]
        kept = earlier[-1] if earlier else "no earlier backup"
        raise BackupError(f"writing the training backup {final} failed ({e}); the partial copy "
                          f"was removed, kept: {kept}") from e
    for old in list_backups(backup_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_backup(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(state, arrays) of one backup directory; BackupError if it cannot be read."""
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        with np.load(os.path.join(path, "variables.npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise BackupError(f"cannot read the training backup {path}: {e}") from e
    return state, arrays


def latest_backup(backup_dir: str):
    """(path, state, arrays) of the newest readable backup, or None. An unreadable newest one
    (a disk error after its rename) falls back to the one before, with a warning."""
    for path in reversed(list_backups(backup_dir)):
        try:
            state, arrays = read_backup(path)
        except BackupError as e:
            logging.warning("%s; trying an older backup", e)
            continue
        return path, state, arrays
    return None


def assign_groups(groups: dict, arrays: dict, path: str, only=None) -> None:
    """Loads `arrays` into the variables of `groups` (or of the groups in `only`), after
    checking that every count and shape matches: a backup of another model is refused."""
    names = only if only is not None else list(groups)
    for g in names:
        stored = sorted(k for k in arrays if k.startswith(g.replace("/", ".") + "."))
        if len(stored) != len(groups[g]):
            raise BackupError(f"backup {path} holds {len(stored)} variables for {g}, this model "
                              f"has {len(groups[g])}: it was made by another model or method")
        for i, v in enumerate(groups[g]):
            value = arrays[_key(g, i)]
            if tuple(value.shape) != tuple(v.shape):
                raise BackupError(f"backup {path}: {g} variable {i} ({v.path}) has shape "
                                  f"{tuple(value.shape)}, the model {tuple(v.shape)}")
    for g in names:
        for i, v in enumerate(groups[g]):
            v.assign(arrays[_key(g, i)])


def flag_differences(saved: dict, current: dict) -> list[str]:
    """`--name: backup X, now Y` for every training flag of this run that differs. A flag the
    run does not have is not compared: backups made before RunConfig held every registered
    method's settings, a run's config holds its own method's only."""
    out = []
    for name in sorted(current):
        if name in RESUMABLE_CHANGES:
            continue
        if saved.get(name) != current.get(name):
            out.append(f"--{name}: backup {saved.get(name)!r}, now {current.get(name)!r}")
    return out


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the training state every `every_steps` batches and at every epoch end, and
    restores one before training (`restore()`, called by `fit_from_backup`).

    `stateful`: {name: callback} whose `backup_state()` / `restore_state(dict)` travel with
    the backup (the best checkpoint's `best`, the epoch logger's history).
    `flags`: the run's flags (`RunConfig.flag_values()`); a resume with different training
    flags is refused. List flags are left out, as backups before RunConfig left them out.
    """

    def __init__(self, backup_dir: str, *, steps_per_epoch: int, every_steps: int = 0,
                 stateful: dict | None = None, flags: dict | None = None):
        super().__init__()
        self.backup_dir, self.steps_per_epoch = backup_dir, int(steps_per_epoch)
        self.every_steps = int(every_steps)
        self.stateful = dict(stateful or {})
        self.flags = {k: v for k, v in (flags or {}).items()
                      if isinstance(v, (str, int, float, bool, type(None)))}
        self.epoch, self.batches, self.rollbacks = 0, 0, 0
        self.last_path = None
        self._metric_values = None  # restored at the start of an interrupted epoch

    def _groups(self):
        return state_groups(self.model)

    def state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.batches - self.epoch
                * self.steps_per_epoch, "batches": self.batches, "rollbacks": self.rollbacks,
                "callbacks": {n: cb.backup_state() for n, cb in self.stateful.items()},
                "flags": self.flags}

    def save(self) -> str:
        self.last_path = write_backup(self.backup_dir, self._groups(), self.state())
        return self.last_path

    def restore(self, model) -> dict | None:
        """Loads the newest backup into `model` and the stateful callbacks; returns its state
        (None when there is none)."""
        self.set_model(model)
        found = latest_backup(self.backup_dir)
        if found is None:
            return None
        path, state, arrays = found
        diff = flag_differences(state.get("flags", {}), self.flags)
        if diff:
            raise BackupError(f"--resume: the backup {path} was made with other training "
                              "flags; rerun with the flags it was made with, or start a new "
                              "run without --resume:\n  " + "\n  ".join(diff))
        groups = self._groups()
        assign_groups(groups, arrays, path, only=[g for g in groups if g != "metrics"])
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.rollbacks = int(state.get("rollbacks", 0))
        for name, cb in self.stateful.items():
            if name in state.get("callbacks", {}):
                cb.restore_state(state["callbacks"][name])
        if state["step_in_epoch"]:
            self._metric_values = (arrays, path)
        self.last_path = path
        return state

    def rollback(self) -> str:
        """Back to the newest backup's weights and optimizer states (the data stream is not
        rewound: the batches since that backup, the bad one included, are skipped)."""
        found = latest_backup(self.backup_dir)
        if found is None:
            raise BackupError(f"no backup in {self.backup_dir} to roll back to")
        path, _, arrays = found
        groups = self._groups()
        assign_groups(groups, arrays, path, only=[g for g in groups if g != "metrics"])
        for m in self.model.metrics:
            m.reset_state()
        self.rollbacks += 1
        return path

    # -- keras hooks --------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if not list_backups(self.backup_dir):
            self.save()  # the initial state: what a divergence before the first backup rolls to

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self._metric_values is not None:  # fit reset them; the epoch's means go on
            arrays, path = self._metric_values
            assign_groups(self._groups(), arrays, path, only=["metrics"])
            self._metric_values = None

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        in_epoch = self.batches - self.epoch * self.steps_per_epoch
        # Not on an epoch's last batch: its validation has not run; the epoch-end backup
        # follows immediately.
        if self.every_steps and self.batches % self.every_steps == 0 \
                and in_epoch < self.steps_per_epoch:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        self.save()


def fit_from_backup(model, make_train_ds, backup: TrainingBackup, *, epochs: int,
                    steps_per_epoch: int, callbacks: list, **fit_kwargs) -> dict | None:
    """`model.fit` from the newest backup in `backup.backup_dir` (or from scratch): the rest
    of an interrupted epoch first, then the remaining epochs. `make_train_ds(batches)` returns
    the training stream positioned after `batches` batches (see the module docstring).
    `backup` must be in `callbacks` (last, so it saves what the others have updated).
    Returns the restored state, or None."""
    state = backup.restore(model)
    # Keras' TF trainer would peek one batch through a throw-away iterator to build the model
    # symbolically (_maybe_symbolic_build). Stateful random ops in tf.data map functions (the
    # augmentation) share their generator state between iterators of one dataset, so that
    # peek would shift the random draws by an amount no resumed run can reproduce. Methods are
    # built with their optimizers before fit, and SegmentationMethod._maybe_symbolic_build
    # then skips the peek (the same override that multi-worker training needs, keras #20585).
    if hasattr(model, "all_optimizers"):
        from uda_tf import keras_compat
        if keras_compat.needs_symbolic_build(model):
            raise BackupError("resume needs the model and every optimizer built before fit "
                              "(build_optimizers), or Keras' build peek shifts the data")
    epoch = backup.epoch
    step = backup.batches - epoch * steps_per_epoch
    if state is not None:
        logging.warning("resuming from %s: epoch %d, step %d of %d", backup.last_path, epoch,
                        step, steps_per_epoch)
    if step and epoch < epochs:
        model.fit(make_train_ds(backup.batches), initial_epoch=epoch, epochs=epoch + 1,
                  steps_per_epoch=steps_per_epoch - step, callbacks=callbacks, **fit_kwargs)
        epoch += 1
    if epoch < epochs:
        model.fit(make_train_ds(backup.batches), initial_epoch=epoch, epochs=epochs,
                  steps_per_epoch=steps_per_epoch, callbacks=callbacks, **fit_kwargs)
    return state
