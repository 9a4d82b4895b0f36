"""Training callbacks: keep the best segmentor by a validation metric, atomically."""
from __future__ import annotations

import math
import os

import keras

from uda_tf.files import atomic_write


def networks(model) -> tuple[keras.Model, keras.Model | None]:
    """(kept, paired): the network a run keeps and exports and the one it may be compared
    with (a method's `kept_network()` and `paired_network()`, e.g. mean teacher's EMA teacher
    and its student); for a plain wrapper, its `segmentor` (else `model` itself) and None."""
    if hasattr(model, "kept_network"):
        return model.kept_network(), model.paired_network()
    return getattr(model, "segmentor", model), None


def kept_network(model) -> keras.Model:
    return networks(model)[0]


def companion_path(path: str, name: str) -> str:
    """Where a checkpoint `<stem>.weights.h5` keeps the weights of the method's exported
    network `name` of the same epoch: `<stem>.<name>.weights.h5`."""
    return f"{path[:-len('.weights.h5')]}.{name}.weights.h5"


class BestSegmentorCheckpoint(keras.callbacks.Callback):
    """Saves the kept network's weights (`kept_network(model)`: the segmentor, or the network
    a method keeps instead) whenever `monitor` improves, and beside them those of the
    networks the method exports with it (`exported_networks()`, e.g. AttENT's translators;
    `companion_path`), so that everything exported comes from the kept epoch.

    The default monitor is source-validation Dice (`val_dice`): target labels never choose a
    checkpoint. Weights are written to a temporary file then renamed, so a crash mid-write
    leaves the previous best intact."""

    def __init__(self, path: str, monitor: str = "val_dice", mode: str = "max"):
        super().__init__()
        if not path.endswith(".weights.h5"):
            raise ValueError(f"checkpoint path must end with .weights.h5, got {path}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.path, self.monitor, self.mode = path, monitor, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"checkpoint monitor {self.monitor!r} not in the epoch logs "
                           f"{sorted(logs)}; is validation data given?")
        value = float(logs[self.monitor])
        better = value > self.best if self.mode == "max" else value < self.best
        if not better:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            from uda_tf.training.guards import ensure_space, weights_file_size
            network = kept_network(self.model)
            exported = (self.model.exported_networks()
                        if hasattr(self.model, "exported_networks") else {})
            for name, companion in exported.items():
                with atomic_write(companion_path(self.path, name), None) as tmp:
                    ensure_space(tmp, weights_file_size(companion.weights), "the checkpoint")
                    companion.save_weights(tmp)
            with atomic_write(self.path, None) as tmp:
                ensure_space(tmp, weights_file_size(network.weights), "the checkpoint")
                network.save_weights(tmp)
        except (OSError, RuntimeError) as e:  # h5py reports a full disk as either
            kept = (f"the previous best {self.path} (epoch {self.best_epoch}, "
                    f"{self.monitor}={self.best:.4f})" if os.path.exists(self.path)
                    else "no earlier checkpoint")
            raise OSError(f"writing the checkpoint {self.path} (epoch {epoch}, {self.monitor}="
                          f"{value:.4f}) failed: {e}; partial file removed, kept: "
                          f"{kept}") from e
        self.best, self.best_epoch = value, epoch

    # Travels with the training backup (training/resume.py), so a resumed run keeps
    # comparing against the best value seen before the crash.
    def backup_state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def restore_state(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), state["best_epoch"]
