"""Disk faults: an output directory that cannot be written is reported before training; a
full disk (RLIMIT_FSIZE: writes fail with EFBIG, as they would with ENOSPC) during a
checkpoint, a backup or an export is reported at that write, saying what was kept, and leaves
no partial file."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from uda_tf.training.guards import check_writable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"--output_dir=.*a_file/runs is not writable.*nothing "
                                      r"was trained"):
        check_writable(str(blocker / "runs"), "--output_dir")
    check_writable(str(tmp_path / "fine"), "--output_dir")
    assert os.listdir(tmp_path / "fine") == []  # the probe is gone


_FULL_DISK = textwrap.dedent('''
    import json, os, resource, signal, sys, types
    import numpy as np
    from tests.helpers import tiny_segmentor
    from uda_tf.serving.export import export_segmentor
    from uda_tf.training.callbacks import BestSegmentorCheckpoint
    from uda_tf.training import resume
    out = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    seg = tiny_segmentor()
    ckpt = BestSegmentorCheckpoint(os.path.join(out, "ck", "best.weights.h5"))
    ckpt.set_model(types.SimpleNamespace(segmentor=seg))
    ckpt.on_epoch_end(0, {"val_dice": 0.5})
    groups = {"model": list(seg.variables)}
    resume.write_backup(os.path.join(out, "backup"), groups, {"batches": 1})
    export_segmentor(seg, os.path.join(out, "export"), "m", warmup_batch_sizes=(1,))
    good = open(os.path.join(out, "ck", "best.weights.h5"), "rb").read()
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    errors = {}
    try:
        ckpt.on_epoch_end(1, {"val_dice": 0.9})
    except OSError as e:
        errors["checkpoint"] = str(e)
    try:
        resume.write_backup(os.path.join(out, "backup"), groups, {"batches": 2})
    except resume.BackupError as e:
        errors["backup"] = str(e)
    try:
        export_segmentor(seg, os.path.join(out, "export"), "m", warmup_batch_sizes=(1,))
    except OSError as e:
        errors["export"] = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    errors["best_intact"] = open(os.path.join(out, "ck", "best.weights.h5"), "rb").read() == good
    errors["best"] = ckpt.best
    print("RESULT" + json.dumps(errors))
''')


def test_full_disk_at_checkpoint_backup_and_export(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert "RESULT" in proc.stdout, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert "writing the checkpoint" in got["checkpoint"] and "no room" in got["checkpoint"]
    assert "kept: the previous best" in got["checkpoint"] and "epoch 0" in got["checkpoint"]
    assert got["best_intact"] and got["best"] == 0.5  # the failed save did not count
    assert "kept: " in got["backup"] and "step-000000001" in got["backup"]
    assert "writing the SavedModel" in got["export"] and "export/m/1" in got["export"]
    assert sorted(os.listdir(tmp_path / "ck")) == ["best.weights.h5"]
    assert sorted(os.listdir(tmp_path / "backup")) == ["step-000000001"]
    assert sorted(os.listdir(tmp_path / "export" / "m")) == ["1"]
