"""Fault-injection benchmark: inject a fault into a real command, and check that the run survives
(resumes or stops cleanly, naming the problem) and that no data is lost.

    .venv/bin/python benchmarks/faults.py          # ~6-10 min on 2 CPU cores

Prints a table (fault, survived, data lost, detail) and writes benchmarks/results/faults.json.
Every command is a real CLI in its own process, on the tiny two-domain MSD dataset of
tests/helpers.py (16x24 slices, a GRL model with 2 base filters).

The full output directory is a tmpfs mounted for the run (`mount -t tmpfs -o size=...`,
needs root); where mounting is not allowed it falls back to an RLIMIT_FSIZE-limited process
(writes past the limit fail with EFBIG), and the JSON says which was used.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "faults.json")
ENV = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
PY = sys.executable


def train_args(data, out, name, *extra):
    return [PY, os.path.join(ROOT, "train.py"), f"--data_dir={data}", "--source_domain=dom_a",
            "--target_domain=dom_b", "--method=grl", "--epochs=2", "--steps_per_epoch=6",
            "--global_batch_size=4", "--base_filters=2", "--shuffle_buffer=16",
            "--deterministic", "--backup_every_steps=1", f"--output_dir={out}",
            f"--run_name={name}", "--mlflow_experiment=faults", "--mlflow_sample_slices=0",
            "--model_name=m", *extra]


def run(args, timeout=600, **kw):
    return subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def kill_when(args, ready, timeout=300):
    """Starts `args`, SIGKILLs it once `ready()` is true; True if it was killed mid-way."""
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=60) == -signal.SIGKILL


def final_backup(run_dir):
    import numpy as np
    names = sorted(n for n in os.listdir(os.path.join(run_dir, "backup"))
                   if n.startswith("step-"))
    with np.load(os.path.join(run_dir, "backup", names[-1], "variables.npz")) as npz:
        return names[-1], {k: npz[k] for k in npz.files}


def same_state(run_a, run_b):
    import numpy as np
    name_a, a = final_backup(run_a)
    name_b, b = final_backup(run_b)
    return name_a == name_b and sorted(a) == sorted(b) and all(
        np.array_equal(a[k], b[k]) for k in a)


def backups(run_dir):
    d = os.path.join(run_dir, "backup")
    return sorted(n for n in os.listdir(d) if n.startswith("step-")) if os.path.isdir(d) else []


# -- the faults ----------------------------------------------------------------------------
def sigkill_training(work, data, reference):
    out = os.path.join(work, "runs")
    killed = kill_when(train_args(data, out, "killed"),
                       lambda: any(n >= "step-000000008" for n in
                                   backups(os.path.join(out, "killed"))))
    state = json.load(open(os.path.join(out, "killed", "backup",
                                        backups(os.path.join(out, "killed"))[-1],
                                        "state.json")))
    resumed = run(train_args(data, out, "killed", "--resume"))
    same = resumed.returncode == 0 and same_state(reference, os.path.join(out, "killed"))
    return {"survived": killed and resumed.returncode == 0, "data_lost": "none" if same else
            "weights differ from an uninterrupted run",
            "detail": f"killed at epoch {state['epoch']} step {state['step_in_epoch']}; "
                      f"resumed, final weights {'bit-identical' if same else 'DIFFER'}"}


def sigkill_prepare(work, raw):
    def prep(out):
        return [PY, "-m", "uda_tf.cli.prepare", "--layout=msd", f"--input_dir={raw}",
                f"--output_dir={out}", "--size=16,24", "--records_per_shard=4", "--workers=1",
                "--noprogress"]
    ref, out = os.path.join(work, "prep_ref"), os.path.join(work, "prep_killed")
    run(prep(ref))
    shards = os.path.join(out, "shards")
    killed = kill_when(prep(out), lambda: os.path.isdir(shards) and len(
        [n for n in os.listdir(shards) if n.endswith(".tfrecord")]) >= 2)
    partial_manifest = os.path.exists(os.path.join(out, "manifest.json"))
    again = run(prep(out))
    same = again.returncode == 0 and json.load(open(os.path.join(out, "manifest.json")))[
        "content_hash"] == json.load(open(os.path.join(ref, "manifest.json")))["content_hash"]
    return {"survived": killed and again.returncode == 0 and not partial_manifest,
            "data_lost": "none" if same else "manifest differs",
            "detail": "killed after 2 shards; no manifest until complete; re-run gives the same "
                      "content hash" if same else last_line(again.stderr)}


def sigkill_export(work, reference):
    ckpt = os.path.join(reference, "checkpoints", "best.weights.h5")
    root = os.path.join(work, "export")
    args = [PY, "-m", "uda_tf.cli.export", f"--checkpoint={ckpt}", f"--export_dir={root}"]
    model_dir = os.path.join(root, "m")
    killed = kill_when(args, lambda: os.path.isdir(model_dir) and any(
        n.endswith(".partial") for n in os.listdir(model_dir)))
    half = [n for n in os.listdir(model_dir) if n.isdigit()] if os.path.isdir(model_dir) else []
    again = run(args)
    ok = again.returncode == 0 and "signatures: serving_default" in again.stdout
    return {"survived": killed and ok and not half,
            "data_lost": "none" if ok else "export failed",
            "detail": f"killed mid-write: {len(half)} version dirs visible (partial is hidden); "
                      f"re-run exported {last_line(again.stdout.split('signatures')[0])}"}


def mlflow_unreachable(work, data):
    out = os.path.join(work, "runs")
    proc = run(train_args(data, out, "offline", "--mlflow_tracking_uri=http://127.0.0.1:9"))
    unsent = os.path.join(out, "offline", "mlflow_unsent.json")
    if proc.returncode != 0 or not os.path.isfile(unsent):
        return {"survived": False, "data_lost": "unknown", "detail": last_line(proc.stderr)}
    pending = json.load(open(unsent))["pending"]
    uri = f"sqlite:///{work}/replay.db"
    replay = run([PY, "-m", "uda_tf.cli.replay_mlflow", f"--replay={unsent}",
                  f"--tracking_uri={uri}"])
    sent = replay.returncode == 0 and not os.path.exists(unsent)
    return {"survived": True, "data_lost": "none" if sent else "buffer not replayed",
            "detail": f"trained offline; {len(pending['metrics'])} metric values, "
                      f"{len(pending['params'])} params buffered to mlflow_unsent.json and "
                      f"{'replayed' if sent else 'NOT replayed'} into a sqlite store"}


_NAN = """
import keras, numpy as np, tensorflow as tf, sys
from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf.methods import GRL
from uda_tf.models.discriminators import domain_classifier
from uda_tf.training import guards, resume
from uda_tf.methods.schedules import LambdaSchedule
seg = tiny_segmentor()
m = GRL(seg, CLASS_NAMES, domain_classifier=domain_classifier(
    [seg.output["features"].shape[1:]], hidden=(8,)),
    lambda_schedule=LambdaSchedule("dann", 1.0, 8))
m.compile(seg=keras.optimizers.Adam(1e-3), disc=keras.optimizers.Adam(1e-3)); m.build_optimizers()
batches = [tiny_batch(seed=i) for i in range(8)]
batches[5][0][0, 3, 3, 0] = np.nan
ds = tf.data.Dataset.from_tensor_slices(((np.stack([b[0] for b in batches]),
    np.stack([b[1] for b in batches])), np.stack([b[2] for b in batches])))
b = resume.TrainingBackup(sys.argv[1], steps_per_epoch=4, every_steps=1)
g = guards.DivergenceGuard(m.gradient_norms, policy=sys.argv[2], backup=b)
try:
    m.fit(ds, epochs=2, steps_per_epoch=4, callbacks=[g, b], verbose=0)
    print("RESULT finite=%s rollbacks=%s" % (all(np.isfinite(v.numpy()).all()
          for v in m.variables), g.rollbacks))
except guards.DivergenceError as e:
    print("RESULT stopped: %s" % e)
"""


def nan_batch(work):
    stop = run([PY, "-c", _NAN, os.path.join(work, "nan_stop"), "stop"])
    roll = run([PY, "-c", _NAN, os.path.join(work, "nan_roll"), "rollback"])
    stop_msg = stop.stdout.split("RESULT", 1)[-1].strip()
    roll_msg = roll.stdout.split("RESULT", 1)[-1].strip()
    named = "step 6" in stop_msg and "seg_loss=nan" in stop_msg
    rolled = roll_msg.startswith("finite=True")
    return {"survived": named and rolled,
            "data_lost": "none (rollback skips the bad batch, and the one since the last "
                         "backup)" if rolled else "run diverged",
            "detail": f"stop: {stop_msg[:90]}...; rollback: {roll_msg[:80]}"}


def corrupted_shard(work, data):
    copy = os.path.join(work, "corrupt_data")
    shutil.copytree(data, copy)
    shard = sorted(os.listdir(os.path.join(copy, "shards")))[0]
    path = os.path.join(copy, "shards", shard)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    proc = run(train_args(copy, os.path.join(work, "runs"), "corrupt"))
    named = proc.returncode != 0 and shard in proc.stderr and "re-run prepare" in proc.stderr
    return {"survived": named, "data_lost": "none (refused before training)",
            "detail": last_line(proc.stderr)}


def full_output_dir(work, data):
    mnt = os.path.join(work, "small_fs")
    os.makedirs(mnt)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt],
                             capture_output=True).returncode == 0
    uri = f"--mlflow_tracking_uri=sqlite:///{work}/full_mlflow.db"
    try:
        if mounted:
            args = train_args(data, mnt, "full", uri)
            proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            run_dir = os.path.join(mnt, "full")
            # Backups rotate (the newest two are kept): wait for the one of step 3.
            while proc.poll() is None and not any(int(n.split("-")[1]) >= 3
                                                  for n in backups(run_dir)):
                time.sleep(0.01)
            # Freeze the training while the disk is filled: a tiny run could otherwise finish
            # before the filler does, and the fault would hit nothing.
            injected = proc.poll() is None
            if injected:
                proc.send_signal(signal.SIGSTOP)
            filler = os.path.join(mnt, "filler")
            # Unbuffered: a buffered close would flush again into the full disk.
            with open(filler, "wb", buffering=0) as f:  # fill it to the last block
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            if injected:
                proc.send_signal(signal.SIGCONT)
            # Keep it full: the run frees space itself (backup rotation deletes the oldest),
            # and another process taking that space is what a full shared disk looks like.
            with open(filler, "ab", buffering=0) as f:
                while proc.poll() is None:
                    try:
                        f.write(b"\0" * 4096)
                    except OSError:
                        time.sleep(0.001)
            _, err = proc.communicate(timeout=600)
            if not injected:
                err = "training finished before the disk was full: fault not injected\n" + err
            kept = backups(run_dir)
            os.remove(filler)
            resumed = run(train_args(data, mnt, "full", uri, "--resume"))
            method = ("tmpfs (mount -t tmpfs -o size=3m), filled after the step-3 backup with "
                      "the training paused (SIGSTOP/SIGCONT)")
        else:
            import resource

            def limit():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
            out = os.path.join(work, "rlimit_runs")
            args = train_args(data, out, "full", uri)
            p = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True,
                               preexec_fn=limit, timeout=600)
            err, run_dir = p.stderr, os.path.join(out, "full")
            kept = backups(run_dir)
            resumed = run(train_args(data, out, "full", uri, "--resume"))
            method = "RLIMIT_FSIZE=20000 bytes (mount not allowed)"
        partial = [n for n in (os.listdir(os.path.join(run_dir, "backup"))
                               if os.path.isdir(os.path.join(run_dir, "backup")) else [])
                   if "partial" in n]
        lines = [line for line in err.strip().splitlines()
                 if line.strip() and " INFO " not in line and "WARNING" not in line]
        message = lines[-1] if lines else ""
        if resumed.returncode != 0:
            message += " | resume: " + " / ".join(resumed.stderr.strip().splitlines()[-2:])
        clean = "kept" in message and not partial
        return {"survived": clean and resumed.returncode == 0,
                "data_lost": "none (resumed from the kept backup)"
                if resumed.returncode == 0 else "resume failed",
                "detail": f"{method}: {message}", "method": method}
    finally:
        if mounted:
            subprocess.run(["umount", mnt], capture_output=True)


def escaping_names(work, data):
    """Run and model names that try to leave their folder, with --overwrite on a victim."""
    victim = os.path.join(work, "victim")
    os.makedirs(victim, exist_ok=True)
    precious = os.path.join(victim, "precious.txt")
    with open(precious, "w") as f:
        f.write("a user's file")
    out = os.path.join(work, "runs_escape")
    tries = {
        "--run_name=../victim": run(train_args(data, out, "../victim", "--overwrite")),
        "--run_name=<abs path>": run(train_args(data, out, victim, "--overwrite")),
        "uda-export --model_name=../../x": run(
            [PY, "-m", "uda_tf.cli.export",
             f"--checkpoint={os.path.join(work, 'runs', 'reference', 'checkpoints', 'best.weights.h5')}",
             f"--export_dir={os.path.join(work, 'export_escape')}", "--model_name=../../x"]),
    }
    refused = {k: p.returncode != 0 and k.split("=")[0].split()[-1] in p.stderr
               for k, p in tries.items()}
    intact = os.path.isfile(precious) and open(precious).read() == "a user's file"
    escaped = os.path.exists(os.path.join(work, "x"))
    return {"survived": all(refused.values()) and intact and not escaped,
            "data_lost": "none" if intact and not escaped else "victim touched",
            "detail": "; ".join(f"{k}: {'refused' if ok else 'NOT refused'}"
                                for k, ok in refused.items())
            + f"; victim intact: {intact}; " + last_line(tries["--run_name=../victim"].stderr)}


def concurrent_prepares(work, raw):
    """Two prepares into one output directory at once: one writes, the other is refused."""
    out = os.path.join(work, "prep_concurrent")
    args = [PY, "-m", "uda_tf.cli.prepare", "--layout=msd", f"--input_dir={raw}",
            f"--output_dir={out}", "--size=16,24", "--records_per_shard=2", "--workers=1",
            "--noprogress"]
    first = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, ".uda_tf.lock")
    deadline = time.time() + 120
    while first.poll() is None and not os.path.exists(lock) and time.time() < deadline:
        time.sleep(0.005)
    overlapped = first.poll() is None
    second = run(args)
    first_out, first_err = first.communicate(timeout=600)
    sys.path.insert(0, ROOT)
    from uda_tf.data.integrity import verify_shards
    from uda_tf.data.manifest import load_manifest
    try:
        verify_shards(load_manifest(out), out)
        consistent = True
    except Exception as e:  # noqa: BLE001  (reported as the row's detail)
        consistent, first_err = False, f"{first_err}\n{type(e).__name__}: {e}"
    refused = second.returncode != 0 and "being written by" in second.stderr
    return {"survived": overlapped and first.returncode == 0 and refused and consistent,
            "data_lost": "none (manifest matches its shards)" if consistent
            else "manifest disagrees with shards",
            "detail": ("" if overlapped else "first finished before the second started; ")
            + f"second: {last_line(second.stderr)}"}


def partial_validation_batch(work, raw, replicas):
    """Validation whose last batch has fewer samples than replicas (e.g. 9 slices, batch 8)."""
    sys.path.insert(0, ROOT)
    from uda_tf.data.manifest import load_manifest
    data = os.path.join(work, "prepared")
    manifest = load_manifest(data)
    val = sum(s["records"] for s in manifest["shards"]
              if s["domain"] == "dom_a" and s["split"] == "val")
    # A global batch that leaves replicas - 1 samples for the last validation batch: fewer
    # than there are replicas (what crashed with 2 replicas, batch 8, 9 slices).
    batch = val - (replicas - 1)
    assert batch > replicas - 1, f"{val} validation slices are too few for this fault"
    out = os.path.join(work, f"runs_partial{replicas}")
    args = [a for a in train_args(data, out, "partial") if not a.startswith(
        ("--global_batch_size", "--steps_per_epoch", "--epochs"))]
    proc = run(args + [f"--global_batch_size={batch}", f"--num_cpu_devices={replicas}",
                       "--epochs=1", "--steps_per_epoch=2"])
    ok = proc.returncode == 0
    result = json.load(open(os.path.join(out, "partial", "result.json"))) if ok else {}
    return {"survived": ok, "data_lost": "none" if ok else "run failed",
            "detail": (f"{val} val slices, batch {batch}, last batch {val % batch} on "
                       f"{replicas} replicas: val_dice={result.get('best_val_dice')}")
            if ok else last_line(proc.stderr)}


def memory_bomb(work):
    """A ~90-byte .nii.gz holding only a header that claims 1000x1000x500 float32 (2 GB), and a
    ~1 MB .nii.gz that really inflates to 600^3 float32 (864 MB): both refused by prepare
    before the voxels are allocated (--max_voxels), with the peak memory of the prepare
    process measured."""
    import gzip

    import nibabel as nib
    import numpy as np
    rows = []
    peak = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_RSS_KB', "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
            "sys.argv[0] = 'prepare'; runpy.run_module('uda_tf.data.prepare', run_name='__main__')")
    # The third raises --max_voxels past the claim: the file-size check (the gzip trailer's
    # length against the header's) must refuse it before the voxels are allocated.
    for name, shape, with_data, extra in (
            ("header only", (1000, 1000, 500), False, []),
            ("gzip bomb", (600, 600, 600), True, []),
            ("header only, --max_voxels=1e9", (1000, 1000, 500), False,
             ["--max_voxels=1000000000"])):
        root = os.path.join(work, "bomb_" + str(len(rows)))
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(np.float32)
        header.set_qform(np.eye(4), 1)
        header.set_sform(np.eye(4), 1)
        image = os.path.join(root, "imagesTr", "bomb_0000.nii.gz")
        with gzip.open(image, "wb", compresslevel=9) as f:
            f.write(header.binaryblock + b"\0" * 4)  # header + empty extension flag
            left = int(np.prod(shape)) * 4 if with_data else 0
            zeros = b"\0" * (1 << 24)
            while left > 0:
                f.write(zeros[: min(left, len(zeros))])
                left -= len(zeros)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)),
                 os.path.join(root, "labelsTr", "bomb.nii.gz"))
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"name": "bomb", "labels": {"background": 0, "x": 1},
                       "channel_names": {"0": "T1"}, "file_ending": ".nii.gz"}, f)
        proc = run([PY, "-c", peak, "--layout=msd", f"--input_dir={root}",
                    f"--output_dir={root}_out", "--workers=1", "--noprogress", *extra])
        kb = [int(line.split()[1]) for line in proc.stderr.splitlines()
              if line.startswith("PEAK_RSS_KB")]
        message = [line for line in proc.stderr.splitlines() if "error" in line]
        rows.append({"case": name, "file_bytes": os.path.getsize(image),
                     "claimed_bytes": int(np.prod(shape)) * 4,
                     "refused": proc.returncode != 0 and "bomb_0000" in proc.stderr
                     and "Traceback" not in proc.stderr,
                     "peak_rss_mb": round(kb[0] / 1024, 1) if kb else None,
                     "message": message[-1][:300] if message else last_line(proc.stderr)})
    survived = all(r["refused"] and r["peak_rss_mb"] is not None
                   and r["peak_rss_mb"] * 2**20 < r["claimed_bytes"] / 2 for r in rows)
    return {"survived": survived, "data_lost": "none (refused before reading voxels)",
            "detail": "; ".join(f"{r['case']} ({r['file_bytes']} B claiming "
                                f"{r['claimed_bytes'] / 1e9:.2f} GB): "
                                f"{'refused' if r['refused'] else 'NOT refused'}, peak RSS "
                                f"{r['peak_rss_mb']} MB: {r['message'][:100]}" for r in rows),
            "cases": rows}

def main():
    work = tempfile.mkdtemp(prefix="uda_faults_")
    sys.path.insert(0, ROOT)
    from tests.helpers import make_msd
    import pathlib
    raw = str(make_msd(pathlib.Path(work) / "raw"))
    data = os.path.join(work, "prepared")
    run([PY, "-m", "uda_tf.cli.prepare", "--layout=msd", f"--input_dir={raw}",
         f"--output_dir={data}", "--size=16,24", "--records_per_shard=8", "--workers=1",
         "--noprogress"])
    out = os.path.join(work, "runs")
    start = time.time()
    ref = run(train_args(data, out, "reference"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = os.path.join(out, "reference")
    faults = {
        "SIGKILL during training": lambda: sigkill_training(work, data, reference),
        "SIGKILL during preparation": lambda: sigkill_prepare(work, raw),
        "SIGKILL during export": lambda: sigkill_export(work, reference),
        "MLflow server unreachable": lambda: mlflow_unreachable(work, data),
        "NaN injected into a batch": lambda: nan_batch(work),
        "corrupted shard": lambda: corrupted_shard(work, data),
        "full output directory": lambda: full_output_dir(work, data),
        "path-escaping run/model name": lambda: escaping_names(work, data),
        "concurrent prepares": lambda: concurrent_prepares(work, raw),
        "partial val batch, 2 replicas": lambda: partial_validation_batch(work, raw, 2),
        "partial val batch, 3 replicas": lambda: partial_validation_batch(work, raw, 3),
        "memory-bomb NIfTI headers": lambda: memory_bomb(work),
    }
    # --only=<words>: rerun the faults whose name contains them; other rows of an earlier
    # JSON are kept.
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    previous = {}
    if only and os.path.isfile(RESULTS):
        previous = {r["fault"]: r for r in json.load(open(RESULTS))["results"]}
    results = []
    for name, fn in faults.items():
        if only and not any(o in name for o in only):
            if name in previous:
                results.append(previous[name])
            continue
        t0 = time.time()
        try:
            r = fn()
        except Exception as e:  # a harness failure is a row, not a crash of the table
            r = {"survived": False, "data_lost": "unknown", "detail": f"{type(e).__name__}: {e}"}
        r.update(fault=name, seconds=round(time.time() - t0, 1))
        results.append(r)
        print(f"{name:28s} survived={'yes' if r['survived'] else 'NO':3s} "
              f"data lost: {r['data_lost']}", flush=True)
    print()
    print(f"{'fault injected':28s} {'survived':8s} {'data lost':45s} detail")
    print("-" * 120)
    for r in results:
        print(f"{r['fault']:28s} {'yes' if r['survived'] else 'NO':8s} "
              f"{r['data_lost'][:45]:45s} {r['detail'][:120]}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results, "total_seconds": round(time.time() - start, 1)}, f,
                  indent=1)
    os.replace(tmp, RESULTS)
    print(f"\nwrote {RESULTS}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
