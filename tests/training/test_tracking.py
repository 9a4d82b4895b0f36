"""MLflow tracking: the run tracker's buffering, resume and replay when the server is away, and
the experiment name. What a training run logs (params, per-epoch metrics, plots, sample
segmentations, a registered model; an unreachable server) is checked on the runs of
tests/cli/test_train_cli.py."""
import logging
import os
import socket

import pytest

from uda_tf.training import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store):
    """One sqlite store for the in-process tests."""
    return mlflow_store(tmp_path_factory.mktemp("store"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_buffered_values_are_sent_when_the_server_comes_back(tmp_path, caplog, store):
    import mlflow
    tracking.set_http_defaults()
    tracker = tracking.RunTracker(f"http://127.0.0.1:{free_port()}", str(tmp_path), "exp",
                                  "flaky")
    tracker.log_params({"lr": 0.1})
    with caplog.at_level(logging.WARNING):
        assert tracker.log_metrics({"loss": 1.0}, step=0) is False
        assert tracker.log_metrics({"loss": 0.5}, step=1) is False
    assert sum("could not log yet" in r.getMessage() for r in caplog.records) == 1
    tracker.tracking_uri = store  # the server is back
    assert tracker.log_metrics({"loss": 0.25}, step=2) is True
    assert tracker.finish() is None
    client = mlflow.MlflowClient(tracker.tracking_uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert history[0].timestamp <= history[2].timestamp  # logged when measured, not when sent
    assert client.get_run(tracker.run_id).data.params == {"lr": "0.1"}


def test_resume_continues_the_same_run(tmp_path, store):
    import mlflow
    uri = store
    first = tracking.RunTracker(uri, str(tmp_path), "exp", "crashy")
    first.log_params({"epochs": 10, "resume": False})
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish("FAILED")  # the crash

    again = tracking.RunTracker(uri, str(tmp_path), "exp", "crashy", resume=True)
    again.log_params({"epochs": 10, "resume": True})
    again.log_metrics({"loss": 0.5}, step=1)
    again.finish()
    assert again.run_id == first.run_id
    run = mlflow.MlflowClient(uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["resume"] == "False" and run.data.tags["resumed/resume"] == "True"
    history = mlflow.MlflowClient(uri).get_metric_history(first.run_id, "loss")
    assert [m.step for m in history] == [0, 1]


@pytest.mark.parametrize("explicit,argv,expected", [
    ("", ["train.py", "--flagfile=configs/demo.cfg", "--flagfile=override.cfg"], "demo"),
    ("", ["train.py", "--flagfile", "/x/grl_crossmoda.cfg"], "grl_crossmoda"),
    ("mine", ["train.py", "--flagfile=configs/demo.cfg"], "mine"),
    ("", ["train.py", "--method=grl"], "uda_tf"),
])
def test_experiment_name(explicit, argv, expected):
    assert tracking.experiment_name(explicit, argv) == expected


# -- the unsent queue: never lost, never a traceback --------------------------------------

def _offline_tracker(run_dir, **kwargs):
    tracking.set_http_defaults()
    return tracking.RunTracker(f"http://127.0.0.1:{free_port()}", str(run_dir), "exp", "r",
                               **kwargs)


def test_truncated_unsent_file_is_named_and_kept(tmp_path, store):
    tracker = _offline_tracker(tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=0, flush=False)
    path = tracker.finish()
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])  # truncated (a copy cut short, a full disk)
    with pytest.raises(tracking.UnsentFileError,
                       match=f"{path}: not complete JSON .*truncated.*kept as it is"):
        tracking.replay_unsent(path, store)
    assert open(path, "rb").read() == whole[: len(whole) // 2]


def test_resume_takes_over_the_unsent_queue_and_keeps_an_unreadable_one(tmp_path, store,
                                                                        caplog):
    import mlflow
    first = _offline_tracker(tmp_path)
    first.log_params({"epochs": 2})
    first.log_metrics({"loss": 1.0}, step=0, flush=False)
    path = first.finish("FAILED")
    # Resumed while MLflow is still away: the queue written holds both attempts' values.
    again = _offline_tracker(tmp_path, resume=True)
    again.log_metrics({"loss": 0.5}, step=1, flush=False)
    assert again.finish() == path
    saved = tracking.read_unsent(path)
    assert [(m["step"], m["value"]) for m in saved["pending"]["metrics"]] == [(0, 1.0),
                                                                              (1, 0.5)]
    assert saved["pending"]["params"] == {"epochs": "2"}
    # Resumed with MLflow back: everything is sent once and the file removed.
    last = tracking.RunTracker(store, str(tmp_path), "exp", "r", resume=True)
    last.log_metrics({"loss": 0.25}, step=2, flush=False)
    assert last.finish() is None and not os.path.exists(path)
    history = mlflow.MlflowClient(store).get_metric_history(last.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]

    # An unreadable queue: a warning naming it, and it is renamed, never overwritten.
    with open(path, "w") as f:
        f.write('{"tracking_uri": "http://x", "pend')
    with caplog.at_level(logging.WARNING):
        broken = _offline_tracker(tmp_path, resume=True)
    assert f"{path}: not complete JSON" in caplog.text
    broken.log_metrics({"loss": 0.1}, step=3, flush=False)
    assert broken.finish() == path
    aside = [n for n in os.listdir(tmp_path) if ".unreadable-" in n]
    assert len(aside) == 1
    assert (tmp_path / aside[0]).read_text() == '{"tracking_uri": "http://x", "pend'
    assert [m["step"] for m in tracking.read_unsent(path)["pending"]["metrics"]] == [3]


def test_finish_never_raises_when_the_queue_cannot_be_written(tmp_path, caplog):
    tracker = _offline_tracker(tmp_path / "gone")  # the run directory was removed
    tracker.log_metrics({"loss": 1.0}, step=0, flush=False)
    with caplog.at_level(logging.ERROR):
        tracker.finish()
    assert "could not be written" in caplog.text
    assert "1 metric values, 0 artifacts not logged" in caplog.text


def test_replay_drops_artifacts_that_no_longer_exist(tmp_path, store, caplog):
    import mlflow
    tracker = _offline_tracker(tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=0, flush=False)
    kept, gone = tmp_path / "kept.txt", tmp_path / "gone.txt"
    kept.write_text("kept")
    gone.write_text("gone")
    tracker.log_artifact(str(kept))
    tracker.log_artifact(str(gone))
    path = tracker.finish()
    gone.unlink()  # removed before the server came back: sending it would fail at every try
    with caplog.at_level("WARNING"):
        tracking.replay_unsent(path, store)
    assert not os.path.exists(path)
    assert "1 pending artifact(s) no longer exist" in caplog.text and str(gone) in caplog.text
    client = mlflow.MlflowClient(store)
    run_id = (tmp_path / tracking.RUN_ID_FILE).read_text().strip()
    assert [a.path for a in client.list_artifacts(run_id)] == ["kept.txt"]
    assert len(client.get_metric_history(run_id, "loss")) == 1


def test_mlflow_store_copies_are_migrated_and_independent(mlflow_store, tmp_path):
    """tests/conftest.py `mlflow_store`: each copy already holds MLflow's schema (no migration
    in the run that opens it) and is a store of its own."""
    import sqlite3

    import mlflow
    a, b = mlflow_store(tmp_path / "a"), mlflow_store(tmp_path / "b", "other.db")
    assert b == f"sqlite:///{tmp_path / 'b' / 'other.db'}"
    with sqlite3.connect(a[len("sqlite:///"):]) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    mlflow.MlflowClient(a).create_experiment("only_in_a")
    assert mlflow.MlflowClient(b).get_experiment_by_name("only_in_a") is None
