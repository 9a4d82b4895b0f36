"""MLflow tracking: one run per training, params = every resolved flag, metrics per epoch.

MLflow calls are batched per epoch (one `log_metrics` call), never per step: a call costs tens
of milliseconds on the embedded sqlite store (shared/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
import platform

import keras
import mlflow
import tensorflow as tf


def default_tracking_uri(output_root: str) -> str:
    """Embedded sqlite store under the output root, as an absolute URI."""
    return "sqlite:///" + os.path.abspath(os.path.join(output_root, "mlflow.db"))


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def environment_tags(strategy: tf.distribute.Strategy) -> dict[str, str]:
    devices = getattr(strategy.extended, "worker_devices", ())
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "replicas": str(strategy.num_replicas_in_sync),
            "devices": ",".join(devices)}


def git_commit(path: str) -> str | None:
    """The commit of the checkout that holds `path`, read from .git without running git."""
    d = os.path.abspath(path)
    while d != os.path.dirname(d):
        head = os.path.join(d, ".git", "HEAD")
        if os.path.isfile(head):
            ref = open(head).read().strip()
            if not ref.startswith("ref: "):
                return ref
            ref_file = os.path.join(d, ".git", ref[5:])
            if os.path.isfile(ref_file):
                return open(ref_file).read().strip()
            packed = os.path.join(d, ".git", "packed-refs")
            if os.path.isfile(packed):
                for line in open(packed):
                    if line.rstrip().endswith(ref[5:]):
                        return line.split()[0]
            return None
        d = os.path.dirname(d)
    return None


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict):
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v) for k, v in params.items()})
    mlflow.set_tags({k: v for k, v in tags.items() if v is not None})
    return run


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs the epoch's metrics in one batched call at the end of each epoch."""

    def on_epoch_end(self, epoch, logs=None):
        if logs:
            mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)
