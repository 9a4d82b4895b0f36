"""Crash and resume as a user meets it: `train.py` killed with SIGKILL mid-epoch, started again
with --resume, ends with exactly the weights, optimizer states, best checkpoint and MLflow
history of a run that was never interrupted (GRL: two optimizers and a lambda schedule)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8  # per epoch; the kill waits for a backup inside the second epoch


def _args(data_dir, tmp_path, name):
    return [sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={data_dir}",
            "--source_domain=dom_a", "--target_domain=dom_b", "--method=grl", "--epochs=2",
            f"--steps_per_epoch={STEPS}", "--global_batch_size=4", "--base_filters=2",
            "--unet_depth=2",
            "--shuffle_buffer=16", "--deterministic", "--backup_every_steps=1",
            f"--output_dir={tmp_path}/runs", f"--run_name={name}",
            f"--mlflow_tracking_uri={_uri(tmp_path, name)}", "--mlflow_experiment=t",
            "--mlflow_sample_slices=0", "--model_name=m", "--nofigures",
            "--nomlflow_input_example"]


def _uri(tmp_path, name):
    """One store per run name (copies of a migrated one, tests/conftest.py `mlflow_store`), so
    the two runs started at the same time keep apart. The killed and the resumed run share
    theirs."""
    return f"sqlite:///{tmp_path}/mlflow_{name}.db"


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _final_backup(run_dir):
    backups = sorted(n for n in os.listdir(run_dir / "backup") if n.startswith("step-"))
    path = run_dir / "backup" / backups[-1]
    with np.load(path / "variables.npz") as npz:
        return backups[-1], {k: npz[k] for k in npz.files}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_prepared, tmp_path,
                                                             mlflow_store):
    data_dir, _ = tiny_prepared
    for name in ("whole", "crash"):
        assert mlflow_store(tmp_path, f"mlflow_{name}.db") == _uri(tmp_path, name)
    whole = subprocess.Popen(_args(data_dir, tmp_path, "whole"), env=_env(), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Killed as soon as a backup inside epoch 1 exists (steps 10.. of 16).
    killed = subprocess.Popen(_args(data_dir, tmp_path, "crash"), env=_env(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backup_dir = tmp_path / "runs" / "crash" / "backup"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if backup_dir.is_dir() and any(n >= f"step-{STEPS + 2:09d}" for n in
                                       os.listdir(backup_dir) if n.startswith("step-")):
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    latest = sorted(n for n in os.listdir(backup_dir) if n.startswith("step-"))[-1]
    state = json.loads((backup_dir / latest / "state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < STEPS, state
    assert not (tmp_path / "runs" / "crash" / "result.json").exists()

    out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, out[-3000:]
    resumed = subprocess.run(_args(data_dir, tmp_path, "crash") + ["--resume"], env=_env(),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {backup_dir / latest}" in resumed.stderr

    # Every variable (segmentor, domain classifier, both Adam states and their iteration
    # counters, which drive the lambda ramp) is bit-identical.
    runs = tmp_path / "runs"
    name_a, a = _final_backup(runs / "whole")
    name_b, b = _final_backup(runs / "crash")
    assert name_a == name_b == f"step-{2 * STEPS:09d}"
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optimizer.disc_optimizer") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ra = json.loads((runs / "whole" / "result.json").read_text())
    rb = json.loads((runs / "crash" / "result.json").read_text())
    assert ra["best_val_dice"] == rb["best_val_dice"] and ra["best_epoch"] == rb["best_epoch"]
    assert (runs / "whole" / "checkpoints" / "best.weights.h5").read_bytes() != b""

    # MLflow: the same run goes on; epoch steps continue (0, 1), none repeated or restarted.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(_uri(tmp_path, "crash"))
    client_a = MlflowClient(_uri(tmp_path, "whole"))
    run_b = client.get_run(rb["mlflow"]["run_id"])
    assert run_b.info.status == "FINISHED" and run_b.info.run_name == "crash"
    for key in ("seg_loss", "val_dice", "grad_norm/seg_optimizer",
                "grad_norm/disc_optimizer"):
        history_b = client.get_metric_history(run_b.info.run_id, key)
        history_a = client_a.get_metric_history(ra["mlflow"]["run_id"], key)
        assert [m.step for m in history_b] == [0, 1], key
        assert [m.value for m in history_b] == [m.value for m in history_a], key
    assert client.get_run(run_b.info.run_id).data.metrics["best_val_dice"] == rb["best_val_dice"]
