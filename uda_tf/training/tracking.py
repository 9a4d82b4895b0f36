"""MLflow tracking: one run per training, params = every resolved flag, metrics per epoch.

Every MLflow call goes through `RunTracker`, which never lets the tracking server stop a
training: what cannot be sent is kept, retried at the next epoch, flushed at the end, and if the
server is still unreachable written to `<run_dir>/mlflow_unsent.json`, which

    python -m uda_tf.cli.replay_mlflow --replay=<run_dir>/mlflow_unsent.json

sends later; a `--resume` of the run takes its queue over, so nothing is sent twice or lost. A
file that cannot be read (truncated, edited) is never removed or overwritten: `read_unsent`
names it in an `UnsentFileError`, and a new queue is written beside it. The happy path costs one batched `log_batch` call per epoch, never one per step:
a call costs tens of milliseconds on the embedded sqlite store (docs/DESIGN.md, stack facts).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings

import keras
import mlflow
import tensorflow as tf
from absl import logging

from uda_tf.files import atomic_write
from uda_tf.training import multiworker

RUN_ID_FILE = "mlflow_run_id"
UNSENT_FILE = "mlflow_unsent.json"
DEFAULT_EXPERIMENT = "uda_tf"
# An unreachable server must cost seconds, not MLflow's default of minutes of retries with
# backoff per call; a value the user exported wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# Per-request limits of MLflow's log_batch.
_BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}


def default_tracking_uri(output_root: str) -> str:
    """Embedded sqlite store under the output root, as an absolute URI."""
    return "sqlite:///" + os.path.abspath(os.path.join(output_root, "mlflow.db"))


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser (MLflow tracking server)"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def set_http_defaults() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def experiment_name(explicit: str, argv) -> str:
    """`explicit` (--mlflow_experiment, on the command line or in a flagfile) wins; else the
    first --flagfile's basename without .cfg (one experiment per config); else "uda_tf"."""
    if explicit:
        return explicit
    for i, arg in enumerate(argv):
        path = None
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
        elif arg == "--flagfile" and i + 1 < len(argv):
            path = argv[i + 1]
        if path:
            name = os.path.basename(path.removeprefix("uda:"))  # uda:NAME: a shipped config
            return name[:-4] if name.endswith(".cfg") else name
    return DEFAULT_EXPERIMENT


def environment_tags(strategy: tf.distribute.Strategy) -> dict[str, str]:
    devices = getattr(strategy.extended, "worker_devices", ())
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "replicas": str(strategy.num_replicas_in_sync),
            "workers": str(multiworker.num_workers(strategy)),
            "devices": ",".join(devices)}


def git_commit(path: str) -> str | None:
    """The commit of the checkout that holds `path`, read from .git without running git;
    outside a checkout (the Docker image) $UDA_TF_GIT_COMMIT, set at build time."""
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
    return os.environ.get("UDA_TF_GIT_COMMIT") or None


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an embedded sqlite store go next to its database file; MLflow's default,
    ./mlruns of whatever the working directory is, scatters them across checkouts."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts go
    db_dir = os.path.dirname(tracking_uri[len("sqlite:///"):])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return os.path.join(db_dir, "mlartifacts", safe)


def experiment_id_for(tracking_uri: str, experiment: str) -> str:
    """The id of the MLflow experiment `experiment` in `tracking_uri`, created (artifacts as
    `_artifact_location` says) when missing."""
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, _artifact_location(tracking_uri, experiment))


def _write_atomic(path: str, text: str) -> None:
    """Written in full under a temporary name, synced, then renamed: a reader finds the old
    file or the new one, never a torn one."""
    with atomic_write(path) as f:
        f.write(text)


class UnsentFileError(ValueError):
    """An mlflow_unsent.json that cannot be read back (truncated, edited, not ours)."""


def _expect(ok: bool, path: str, where: str, expected: str) -> None:
    if not ok:
        raise UnsentFileError(f"{path}: {where} is not {expected}; the file is kept as it is "
                              "(nothing was sent or removed)")


def _is_text(value) -> bool:
    return isinstance(value, str)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_unsent(path: str) -> dict:
    """The contents of an mlflow_unsent.json written by `RunTracker.finish`, checked field by
    field; UnsentFileError naming the file and what is wrong otherwise (never another error:
    tests/training/test_replay_properties.py)."""
    saved = _read_json_object(path)
    for key in ("tracking_uri", "experiment"):
        _expect(_is_text(saved.get(key)), path, f"{key!r}", "a string")
    for key in ("run_name", "run_id", "last_error"):
        _expect(saved.get(key) is None or _is_text(saved[key]), path, f"{key!r}",
                "a string or null")
    _expect(saved.get("status", "FINISHED") in ("FINISHED", "FAILED", "KILLED", "RUNNING",
                                                "SCHEDULED"), path, "'status'",
            "an MLflow run status")
    saved["pending"] = _checked_pending(saved.get("pending"), path)
    return saved


def _read_json_object(path: str) -> dict:
    """The JSON object in `path`; UnsentFileError saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UnsentFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        saved = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UnsentFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the file "
                              "is kept as it is (nothing was sent or removed)") from None
    except json.JSONDecodeError as e:
        raise UnsentFileError(f"{path}: not complete JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno}; truncated?); the file is kept as it is (nothing was "
                              "sent or removed)") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of 5000 digits, deep nesting
        raise UnsentFileError(f"{path}: not readable JSON ({type(e).__name__}); the file is "
                              "kept as it is (nothing was sent or removed)") from None
    _expect(isinstance(saved, dict), path, "the top level", "a JSON object")
    return saved


# A dataset input of the run (MLflow's dataset lineage): what `RunTracker.log_input` queues.
_INPUT_KEYS = ("name", "digest", "source", "context")


def _checked_pending(pending, path: str) -> dict:
    """The queue of an unsent file, every entry checked, with only the keys replay reads."""
    _expect(isinstance(pending, dict), path, "'pending'", "a JSON object")
    for key in ("params", "tags"):
        group = pending.get(key, {})
        _expect(isinstance(group, dict) and all(_is_text(v) for v in group.values()), path,
                f"pending {key!r}", "an object of strings")
    metrics = pending.get("metrics", [])
    _expect(isinstance(metrics, list), path, "pending 'metrics'", "a list")
    for i, m in enumerate(metrics):
        _expect(isinstance(m, dict) and _is_text(m.get("key")) and _is_number(m.get("value"))
                and all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool)
                        for k in ("timestamp", "step")),
                path, f"pending metric {i}", "{key: string, value: number, timestamp: "
                "integer, step: integer}")
    artifacts = pending.get("artifacts", [])
    _expect(isinstance(artifacts, list), path, "pending 'artifacts'", "a list")
    for i, a in enumerate(artifacts):
        _expect(isinstance(a, dict) and _is_text(a.get("path"))
                and (a.get("artifact_path") is None or _is_text(a.get("artifact_path"))),
                path, f"pending artifact {i}", "{path: string, artifact_path: string or null}")
    model = pending.get("model")
    _expect(model is None or (isinstance(model, dict) and _is_text(model.get("saved_model"))
                              and all(_is_text(model.get(k, ""))
                                      for k in ("register_name", "alias", "name"))
                              and isinstance(model.get("step", 0), int)
                              and not isinstance(model.get("step", 0), bool)
                              and isinstance(model.get("input_example", False), bool)),
            path, "pending 'model'", "null or {saved_model, register_name, alias, name: "
            "strings, step: integer, input_example: boolean}")
    inputs = pending.get("inputs", [])
    _expect(isinstance(inputs, list) and all(
        isinstance(d, dict) and all(_is_text(d.get(k)) for k in _INPUT_KEYS) for d in inputs),
        path, "pending 'inputs'", "a list of {" + ", ".join(_INPUT_KEYS) + ": strings}")
    return {"params": dict(pending.get("params", {})), "tags": dict(pending.get("tags", {})),
            "metrics": [{k: m[k] for k in ("key", "value", "timestamp", "step")}
                        for m in metrics],
            "artifacts": [{"path": a["path"], "artifact_path": a.get("artifact_path")}
                          for a in artifacts],
            "inputs": [{k: d[k] for k in _INPUT_KEYS} for d in inputs],
            "model": None if model is None else {
                "saved_model": model["saved_model"],
                "register_name": model.get("register_name", ""), "alias": model.get("alias", ""),
                "name": model.get("name", "model"), "step": model.get("step", 0),
                "input_example": model.get("input_example", False)}}


def _set_aside(path: str) -> str:
    """Renames an unreadable queue file out of the way (kept for the user), returns its name."""
    aside = f"{path[:-len('.json')]}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.json"
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path[:-len('.json')]}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{n}.json"
    os.replace(path, aside)
    return aside


class RunTracker:
    """Buffered MLflow logging for one run (fluent API: the run is MLflow's active run).

    Everything logged is queued and sent by `flush()`; a failed call leaves the queue in place,
    warns once, and the next `flush()` (next epoch) retries. `finish()` flushes, ends the run,
    and writes the queue to `<run_dir>/mlflow_unsent.json` if it could not be sent.
    The run id is stored in `<run_dir>/mlflow_run_id`; with `resume`, that run is continued.
    """

    def __init__(self, tracking_uri: str, run_dir: str, experiment: str, run_name: str, *,
                 resume: bool = False, system_metrics: bool = False):
        self.tracking_uri, self.run_dir = tracking_uri, run_dir
        self.system_metrics = system_metrics
        self.experiment, self.run_name = experiment, run_name
        self.run_id = None
        self.resume_id = None
        id_file = os.path.join(run_dir, RUN_ID_FILE)
        if resume and os.path.isfile(id_file):
            self.resume_id = open(id_file).read().strip() or None
        self.pending = {"params": {}, "tags": {}, "metrics": [], "artifacts": [], "inputs": [],
                        "model": None}
        self.model_info = None
        self.last_error = None
        self._client = None
        self._failing = False
        self._adopted = None  # an earlier mlflow_unsent.json whose queue is now ours
        self._unreadable = None  # one that could not be read: kept, never overwritten
        if resume:
            self._adopt_unsent(os.path.join(run_dir, UNSENT_FILE))

    def _adopt_unsent(self, path: str) -> None:
        """--resume: what the earlier attempt could not send goes first in our queue (removed
        from disk once sent). An unreadable file is named in a warning and kept."""
        if not os.path.exists(path):
            return
        try:
            saved = read_unsent(path)
        except UnsentFileError as e:
            self._unreadable = path
            logging.warning("%s\nResuming without it; it will be renamed, not overwritten, if "
                            "this run has values to keep too.", e)
            return
        self.pending = still_sendable(saved["pending"], path)
        if self.resume_id is None:
            self.resume_id = saved.get("run_id")
        self._adopted = path
        logging.warning("--resume: took over the values %s could not send (%s)", path,
                        self.summary())

    # -- queueing ---------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        self.pending["params"].update({k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        self.pending["tags"].update({k: str(v) for k, v in tags.items() if v is not None})

    def log_metrics(self, metrics: dict, step: int = 0, *, flush: bool = True) -> bool:
        """One batched call for all of `metrics` (timestamped now, whenever they are sent)."""
        now = int(time.time() * 1000)
        self.pending["metrics"].extend(
            {"key": k, "value": float(v), "timestamp": now, "step": int(step)}
            for k, v in metrics.items())
        return self.flush() if flush else False

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file or a directory (its contents go under `artifact_path`)."""
        self.pending["artifacts"].append({"path": os.path.abspath(path),
                                          "artifact_path": artifact_path})

    def log_input(self, name: str, digest: str, source: str, context: str) -> None:
        """A dataset the run read (MLflow dataset lineage: the run's Inputs), identified by
        `digest`; `context` says how it was used (e.g. training)."""
        self.pending["inputs"].append({"name": name, "digest": digest, "source": source,
                                       "context": context})

    def log_saved_model(self, saved_model: str, *, register_name: str = "", alias: str = "",
                        name: str = "model", step: int = 0,
                        input_example: bool = False) -> None:
        """Log the SavedModel as an MLflow pyfunc model named `name`, optionally registered
        with an alias. MLflow links the run's metrics logged at `step` (the kept epoch) to it."""
        self.pending["model"] = {"saved_model": os.path.abspath(saved_model),
                                 "register_name": register_name, "alias": alias, "name": name,
                                 "step": int(step), "input_example": bool(input_example)}

    def summary(self) -> str:
        p = self.pending
        parts = [f"{len(p['params'])} params", f"{len(p['tags'])} tags",
                 f"{len(p['metrics'])} metric values", f"{len(p['artifacts'])} artifacts"]
        if p["inputs"]:
            parts.append(f"{len(p['inputs'])} dataset inputs")
        if p["model"]:
            parts.append(f"the model {p['model']['saved_model']}")
        return ", ".join(parts)

    def _empty(self) -> bool:
        p = self.pending
        return not (p["params"] or p["tags"] or p["metrics"] or p["artifacts"]
                    or p["inputs"] or p["model"])

    # -- sending ----------------------------------------------------------------------
    def _start(self) -> None:
        mlflow.set_tracking_uri(self.tracking_uri)
        run = None
        if self.resume_id:
            try:
                run = mlflow.start_run(run_id=self.resume_id,
                                       log_system_metrics=self.system_metrics)
            except mlflow.exceptions.MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logging.warning("MLflow run %s (from %s) is not in %s; starting a new run",
                                self.resume_id, RUN_ID_FILE, self.tracking_uri)
            else:
                self._keep_new_params(run.data.params)
        if run is None:
            experiment_id = experiment_id_for(self.tracking_uri, self.experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name,
                                   log_system_metrics=self.system_metrics)
        self.run_id = run.info.run_id
        self._client = mlflow.MlflowClient(self.tracking_uri)
        _write_atomic(os.path.join(self.run_dir, RUN_ID_FILE), self.run_id + "\n")

    def _keep_new_params(self, logged: dict) -> None:
        """MLflow params are immutable: on resume, send only new ones; a changed value (e.g.
        --resume itself) is kept as a `resumed/<name>` tag instead."""
        for name in list(self.pending["params"]):
            if name in logged:
                value = self.pending["params"].pop(name)
                if value != logged[name]:
                    self.pending["tags"][f"resumed/{name}"] = value

    def flush(self) -> bool:
        """Send what is queued; False (and the queue kept) if MLflow cannot be reached."""
        if self.run_id is not None and self._empty():
            return True
        try:
            if self.run_id is None:
                self._start()
            self._send_batches()
            self._send_inputs()
            while self.pending["artifacts"]:
                item = self.pending["artifacts"][0]
                if os.path.isdir(item["path"]):
                    mlflow.log_artifacts(item["path"], item["artifact_path"])
                else:
                    mlflow.log_artifact(item["path"], item["artifact_path"])
                self.pending["artifacts"].pop(0)
            if self.pending["model"]:
                self.model_info = log_saved_model(**self.pending["model"])
                self.pending["model"] = None
        except Exception as e:  # any failure: the server, the network, or the store
            self.last_error = f"{type(e).__name__}: {e}"
            if not self._failing:
                logging.warning(
                    "MLflow (%s) failed: %s\nTraining goes on; could not log yet: %s. Retrying at "
                    "the next epoch.", self.tracking_uri, self.last_error[:500], self.summary())
            self._failing = True
            return False
        if self._failing:
            logging.warning("MLflow (%s) reachable again; buffered values sent",
                            self.tracking_uri)
            self._failing = False
        if self._adopted is not None:  # the earlier attempt's queue is sent with ours
            try:
                os.remove(self._adopted)
            except FileNotFoundError:
                pass
            self._adopted = None
        return True

    def _send_batches(self) -> None:
        from mlflow.entities import Metric, Param, RunTag
        p = self.pending
        while p["metrics"] or p["params"] or p["tags"]:
            metrics = p["metrics"][:_BATCH_LIMITS["metrics"]]
            params = list(p["params"].items())[:_BATCH_LIMITS["params"]]
            tags = list(p["tags"].items())[:_BATCH_LIMITS["tags"]]
            self._client.log_batch(
                self.run_id,
                metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"])
                         for m in metrics],
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in tags], synchronous=True)
            # Dropped only once sent, so a failure mid-way re-sends the rest, not everything.
            del p["metrics"][:len(metrics)]
            for k, _ in params:
                del p["params"][k]
            for k, _ in tags:
                del p["tags"][k]

    def _send_inputs(self) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        inputs = self.pending["inputs"]
        if inputs:
            self._client.log_inputs(self.run_id, datasets=[
                DatasetInput(Dataset(d["name"], d["digest"], "local", json.dumps(
                    {"uri": d["source"]})), tags=[InputTag("mlflow.data.context", d["context"])])
                for d in inputs])
            inputs.clear()

    def finish(self, status: str = "FINISHED") -> str | None:
        """Flush, end the run; returns the path of mlflow_unsent.json if anything is left
        (None: all sent). Never raises: a queue that cannot be written is logged as lost."""
        sent = self.flush()
        if sent:
            try:
                mlflow.end_run(status=status)
                return None
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
        path = os.path.join(self.run_dir, UNSENT_FILE)
        what = self.summary()
        written = False
        try:
            if self._unreadable is not None and os.path.exists(self._unreadable):
                aside = _set_aside(self._unreadable)
                logging.warning("kept the unreadable %s as %s", self._unreadable, aside)
                self._unreadable = None
            _write_atomic(path, json.dumps({
                "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "run_name": self.run_name, "run_id": self.run_id or self.resume_id,
                "status": status, "last_error": self.last_error, "pending": self.pending},
                indent=1))
            written = True
        except (OSError, TypeError, ValueError) as e:
            # Never the end of a training that is already done: say what is lost instead.
            logging.error("MLflow (%s) unreachable and %s could not be written (%s): %s not "
                          "logged", self.tracking_uri, path, e, what)
        if mlflow.active_run() is not None:
            try:  # a run we started stays RUNNING on the server; only the local state ends
                mlflow.end_run(status=status)
            except Exception:
                pass
        if written:
            logging.warning(
                "MLflow (%s) still unreachable at the end: could not log %s (last error: %s)."
                "\nSaved to %s; send it later with\n  python -m uda_tf.cli.replay_mlflow "
                "--replay=%s", self.tracking_uri, what, (self.last_error or "")[:300], path,
                path)
        return path


class MlflowEpochLogger(keras.callbacks.Callback):
    """Sends the epoch's metrics in one batched call at the end of each epoch, and keeps them
    ({name: [(epoch, value)]}) for the learning-curve plots."""

    def __init__(self, tracker: RunTracker):
        super().__init__()
        self.tracker = tracker
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        values = {k: float(v) for k, v in logs.items()}
        for k, v in values.items():
            self.history.setdefault(k, []).append((epoch, v))
        self.tracker.log_metrics(values, step=epoch)

    # Travels with the training backup (training/resume.py): the learning curves of a resumed
    # run start at epoch 0, not at the resume.
    def backup_state(self) -> dict:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def restore_state(self, state: dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state["history"].items()}


class EpochFigures(keras.callbacks.Callback):
    """After each epoch, draws the pictures the method's callbacks offer and logs them to
    MLflow. A source offers `epoch_figures()` -> (name, title, {column: [rows, H, W(, 1)]},
    colour-map columns) or None; `draw(columns, path, maps=, title=)` (train.py passes
    uda_tf.evaluation.figures.image_grid) writes <plots_dir>/<name>.png, logged under
    plots/<dirname of name>. Comes after those callbacks in the list (they make the panels in
    their own on_epoch_end), on the chief only."""

    def __init__(self, sources, plots_dir: str, tracker: RunTracker, draw):
        super().__init__()
        self.sources, self.plots_dir, self.tracker, self.draw = (list(sources), plots_dir,
                                                                 tracker, draw)

    def on_epoch_end(self, epoch, logs=None):
        for source in self.sources:
            figure = source.epoch_figures()
            if figure is None:
                continue
            name, title, columns, maps = figure
            path = self.draw(columns, os.path.join(self.plots_dir, f"{name}.png"), maps=maps,
                             title=title)
            self.tracker.log_artifact(path, artifact_path=os.path.dirname(f"plots/{name}"))


INPUT_EXAMPLE_VALUES = 1 << 18  # the largest input example stored with a logged model


def log_saved_model(saved_model: str, register_name: str = "", alias: str = "",
                    name: str = "model", step: int = 0, input_example: bool = False) -> dict:
    """Log a SavedModel as an MLflow pyfunc model in the active run and register it with an
    alias when asked. uda_tf/serving/pyfunc.py wraps the exported directory itself, so the
    MLflow model is byte for byte what TF Serving serves; mlflow.tensorflow.log_model does take
    the Keras 3 segmentor (checked with MLflow 3.17), but its predict returns the raw Keras
    outputs (logits, features), not probabilities/labels/entropy."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from tensorflow.core.protobuf import saved_model_pb2
    # The signature is read from saved_model.pb itself: loading the SavedModel would rebuild
    # its graphs (seconds) only to look at its input and output specs.
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    serve = proto.meta_graphs[0].signature_def["serving_default"]

    def spec(info, name=None):  # TensorInfo; a variable dimension is -1, as MLflow writes it
        shape = [int(d.size) for d in info.tensor_shape.dim]
        return TensorSpec(np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype), shape, name)

    signature = ModelSignature(
        inputs=Schema([spec(serve.inputs["image"])]),
        outputs=Schema([spec(info, key) for key, info in sorted(serve.outputs.items())]))
    # An input example of one blank image (no patient data), when the input size is fixed and
    # small enough to store as JSON (2D slices; a 3D patch is left without one). MLflow stores
    # it with the model and checks, by loading the logged model and predicting it, that the
    # model serves it.
    size = [int(d.size) for d in serve.inputs["image"].tensor_shape.dim][1:]
    small = bool(size) and min(size) > 0 and math.prod(size) <= INPUT_EXAMPLE_VALUES
    example = np.zeros([1, *size], np.float32) if input_example and small else None
    # A models-from-code file, given to MLflow as a path (not imported: serving is a layer up).
    code = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "serving", "pyfunc.py")
    with warnings.catch_warnings():  # "add type hints", "no input example": not for tensors
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name or "model", python_model=code, artifacts={"saved_model": saved_model},
            signature=signature, step=step, input_example=example,
            # Explicit requirements: inferring them would load the model in a subprocess.
            pip_requirements=[f"tensorflow~={tf.__version__}", f"mlflow=={mlflow.__version__}",
                              f"numpy=={np.__version__}"])
    result = {"model_uri": info.model_uri}
    mlflow.set_tag("mlflow_model_uri", info.model_uri)
    if register_name:
        version = mlflow.register_model(info.model_uri, register_name)
        result.update(registered_model=register_name, version=version.version)
        if alias:
            mlflow.MlflowClient().set_registered_model_alias(register_name, alias,
                                                             version.version)
            result["alias"] = alias
        mlflow.set_tag("registered_model", f"{register_name}/{version.version}"
                       + (f"@{alias}" if alias else ""))
    return result


def still_sendable(pending: dict, path: str) -> dict:
    """`pending` less the artifacts (and model) whose files no longer exist: removed or
    rewritten since, sending them would fail at every try. A warning names them."""
    missing = [a["path"] for a in pending["artifacts"] if not os.path.exists(a["path"])]
    model = pending["model"]
    if model and not os.path.exists(model["saved_model"]):
        missing.append(model["saved_model"])
        model = None
    if missing:
        logging.warning("%s: %d pending artifact(s) no longer exist and are dropped: %s",
                        path, len(missing), ", ".join(missing[:5]))
    return {"params": pending["params"], "tags": pending["tags"], "metrics": pending["metrics"],
            "artifacts": [a for a in pending["artifacts"] if a["path"] not in missing],
            "inputs": pending["inputs"], "model": model}


def replay_unsent(path: str, tracking_uri: str | None = None) -> dict | None:
    """Send an mlflow_unsent.json written by `RunTracker.finish`; removes it once sent.
    Returns the logged model's info (if one was pending). UnsentFileError (the file kept) if
    it cannot be read; RuntimeError (the file kept, rewritten) if MLflow is still away."""
    saved = read_unsent(path)
    tracker = RunTracker(tracking_uri or saved["tracking_uri"], os.path.dirname(path),
                         saved["experiment"], saved["run_name"])
    tracker.resume_id = saved.get("run_id")
    tracker.pending = still_sendable(saved["pending"], path)
    if tracker.finish(saved.get("status", "FINISHED")) is not None:
        raise RuntimeError(f"MLflow still unreachable; {path} kept ({tracker.last_error})")
    os.remove(path)
    return tracker.model_info
