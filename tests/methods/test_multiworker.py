"""MultiWorkerMirroredStrategy across two processes on 127.0.0.1: the alternating adversarial
method (three optimizers, each with its own sub-network) trains through Keras fit with
validation, both workers end with bit-identical weights, and only the chief writes the
checkpoint (the other's temporary directory is removed). GRL (two optimizers) trains on two
workers through train.py in tests/cli/test_multiworker_cli.py; the worker script still takes
`grl` (tests/methods/multiworker_worker.py)."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_worker.py")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:  # all bound at once, so the n ports differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# the logs each method must agree on across workers
LOGGED = {"adversarial": ("seg_loss", "d_loss_feature", "d_loss_entropy", "adv_loss", "val_dice")}


@pytest.mark.parametrize("method", sorted(LOGGED))
def test_two_workers_train_to_identical_weights(method, tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, WORKER, data_dir, str(tmp_path), method],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    # ~25 s on a quiet 2-core machine; the limit allows for a loaded one.
    deadline, outputs = time.monotonic() + 300, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]

    infos = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert [i["chief"] for i in infos] == [True, False]
    assert all(i["workers"] == 2 and i["replicas"] == 2 for i in infos)
    # Only the chief writes into the run; the other worker's directory is gone afterwards.
    assert infos[0]["wrote_checkpoint"] and infos[0]["write_dir"] == str(tmp_path / "run")
    assert infos[1]["wrote_checkpoint"] and not infos[1]["write_dir"].startswith(str(tmp_path))
    assert not infos[1]["write_dir_left"]
    assert (tmp_path / "run" / "checkpoints" / "best.weights.h5").is_file()
    # Logs are cross-worker means: the same scalars on both workers.
    for key in LOGGED[method]:
        assert len(infos[0]["history"][key]) == 1, infos[0]["history"]
        assert np.isfinite(infos[0]["history"][key]).all()
        np.testing.assert_allclose(infos[0]["history"][key], infos[1]["history"][key], rtol=1e-6)

    w0, w1 = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    n = len([k for k in w0.files if k.startswith("after")])
    assert n > 0 and sorted(w0.files) == sorted(w1.files)
    moved = max(float(np.abs(w0[f"after{i}"] - w0[f"before{i}"]).max()) for i in range(n))
    assert moved > 1e-4, "training did not change the weights; the comparison would be empty"
    for i in range(n):
        np.testing.assert_array_equal(w0[f"before{i}"], w1[f"before{i}"])
        np.testing.assert_array_equal(w0[f"after{i}"], w1[f"after{i}"])
