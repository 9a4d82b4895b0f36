"""train.py as two worker processes on 127.0.0.1 (TF_CONFIG), the way a user starts a
multi-worker run. AttENT, the method with the most moving parts (six optimizers, each with its
own sub-network; a fake pool per replica in variables synchronised on read; a phase switch
after the first epoch that traces the step again; plus MinEnt), trains on both workers through
train.py's command line (tests/cli/train_worker.py records the trainable variables around
fit); both end with bit-identical weights and the same cross-worker logs; the chief writes the
run (checkpoint, SavedModel, evaluation, one MLflow run) and the other worker writes nothing
that outlives it. Flags that cannot work across workers are refused, naming the flag. RUNS can
hold more methods (each run costs about a minute of both cores; the adversarial method ran
here until AttENT took its place, and the other methods' steps are compared on two in-process
replicas in tests/methods/test_distributed.py)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cli_runner import run_cli
from tests.helpers import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")


def _start_workers(args, tmp_path, n=2):
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    procs = []
    for index in range(n):
        tmpdir = tmp_path / f"tmp{index}"
        tmpdir.mkdir()
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2",
               "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmpdir),
               "UDA_TEST_WORKER_OUT": str(tmp_path / f"worker{index}.npz")}
        procs.append(subprocess.Popen([sys.executable, WORKER, *args],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, limit):
    deadline, outputs = time.monotonic() + limit, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


# method: (its flags, logged metrics both workers must agree on)
RUNS = {
    "attent": (["--translation_epochs=1", "--translator_filters=2", "--fake_pool_size=3"],
               ("seg_loss", "ent_loss", "g_loss", "cycle_loss", "d_img_loss", "d_ent_loss")),
}


@pytest.mark.parametrize("method", sorted(RUNS))
@pytest.mark.slow
def test_two_train_processes(method, tiny_prepared, tmp_path, mlflow_store):
    data_dir, _ = tiny_prepared
    uri = mlflow_store(tmp_path)
    method_flags, keys = RUNS[method]
    procs = _start_workers([
        f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
        f"--method={method}", *method_flags, "--minent_weight=0.01", "--cluster=tf_config",
        "--epochs=2", "--steps_per_epoch=2", "--global_batch_size=4", "--base_filters=2",
        "--unet_depth=2",
        f"--output_dir={tmp_path}/runs", "--run_name=mw", f"--mlflow_tracking_uri={uri}",
        "--model_name=mw", "--mlflow_experiment=test", "--mlflow_sample_slices=0",
        "--nofigures", "--nomlflow_input_example"], tmp_path)
    # About 70 s on a quiet 2-core machine. The limit only guards against a hang: attent
    # took over 480 s on a 2-core machine about 6x slower for TensorFlow, sharing its cores.
    outputs = _wait(procs, 1200)
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, (out[-2000:], err[-4000:])
    assert "worker done; the chief writes the run" in outputs[1][0]

    run = tmp_path / "runs" / "mw"
    result = json.loads((run / "result.json").read_text())
    assert os.listdir(tmp_path / "runs") == ["mw"]
    assert (run / "checkpoints" / "best.weights.h5").is_file()
    assert os.path.isdir(result["saved_model"])
    if method == "attent":  # the kept epoch's translators, exported in `translate`
        for name in ("to_target", "to_source"):
            assert (run / "checkpoints" / f"best.{name}.weights.h5").is_file()
        import tensorflow as tf
        assert "translate" in tf.saved_model.load(result["saved_model"]).signatures
    assert result["evaluations"]["source"]["summary"]["foreground"]["dice"]["n"] > 0
    # the other worker's temporary run directory is gone
    assert os.listdir(tmp_path / "tmp1") == []
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1  # only the chief tracks
    for key in (*keys, "val_dice"):
        metrics = client.get_metric_history(runs[0].info.run_id, key)
        assert [m.step for m in metrics] == [0, 1], key
    assert runs[0].data.tags["workers"] == "2", runs[0].data.tags

    # Both workers: the same weights before and after (each update is the all-reduced one),
    # and the same logs (cross-worker means); training moved the weights.
    w0, w1 = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    assert sorted(w0.files) == sorted(w1.files)
    history = [json.loads(str(w["history"])) for w in (w0, w1)]
    for key in (*keys, "val_dice"):
        assert len(history[0][key]) == 2 and np.isfinite(history[0][key]).all(), history[0]
        np.testing.assert_allclose(history[0][key], history[1][key], rtol=1e-6, err_msg=key)
    n = len([k for k in w0.files if k.startswith("after")])
    assert n > 0
    moved = max(float(np.abs(w0[f"after{i}"] - w0[f"before{i}"]).max()) for i in range(n))
    assert moved > 1e-4, "training did not change the weights; the comparison would be empty"
    for i in range(n):
        np.testing.assert_array_equal(w0[f"before{i}"], w1[f"before{i}"])
        np.testing.assert_array_equal(w0[f"after{i}"], w1[f"after{i}"])


@pytest.mark.parametrize("flag", ["--on_divergence=rollback", "--resume"])
def test_flags_that_need_one_worker_are_refused(flag, tiny_prepared, tmp_path, monkeypatch):
    """Refused from TF_CONFIG alone, before the strategy waits for the other workers: a worker
    started alone gets the error at once instead of hanging (here one worker of two, in this
    process, with no second one ever started)."""
    data_dir, _ = tiny_prepared
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers},
                                                "task": {"type": "worker", "index": 0}}))
    proc = run_cli("uda_tf.cli.train", [
        f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
        "--method=grl", "--cluster=tf_config", f"--output_dir={tmp_path}/runs", "--run_name=x",
        flag])
    assert proc.returncode != 0
    assert flag.split("=")[0] in proc.stderr and "several workers (2" in proc.stderr, \
        proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
