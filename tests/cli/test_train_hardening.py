"""train.py and a user's files: names that stay inside --output_dir, --overwrite that removes
only a run uda_tf made and only once every check has passed, one writer per run, --resume of
something that is there, splits checked at start-up, and errors rather than tracebacks.

Most tests call `train.train(cfg)` in-process with the flags' defaults (cheap: no TensorFlow
start-up); two run the CLI to see what a user sees."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from absl import app

from tests.cli_runner import run_cli
from uda_tf import files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(data_dir, out, **overrides):
    """The RunConfig train.py's main passes: every flag's default, then a tiny run."""
    from absl import flags
    from uda_tf.cli import train
    from uda_tf.training.config import RunConfig
    train.define_flags()  # once per process
    values = {name: flags.FLAGS[name].default for name in train._NAMES}
    values.update(data_dir=data_dir, source_domain="dom_a", target_domain="dom_b",
                  method="source_only", epochs=1, steps_per_epoch=1, global_batch_size=2,
                  base_filters=2, unet_depth=2, output_dir=str(out), run_name="run",
                  mlflow_tracking_uri=f"sqlite:///{out}/mlflow.db", mlflow_experiment="t",
                  mlflow_sample_slices=0, figures=False, model_name="m", check_shards=False,
                  backup_every_steps=0, target_criteria=False, mlflow_input_example=False,
                  mlflow_system_metrics=False)
    values.update(overrides)
    return RunConfig.from_flags(values)


def _train(cfg):
    from uda_tf.cli import train
    return train.train(cfg)


def _precious(directory, marker=False):
    """A directory holding a user's file (and uda_tf's marker when `marker`)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "precious.txt"), "w") as f:
        f.write("keep me")
    if marker:
        files.mark_created(str(directory), "run")
    return directory


def _intact(directory):
    return open(os.path.join(directory, "precious.txt")).read() == "keep me"


# -- 1. names -----------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("run_name", "../victim"), ("run_name", "ABSOLUTE"), ("run_name", "a/b"),
    ("model_name", "../../victim"), ("register_model_name", "team/seg"),
    ("register_model_name", "seg:1"), ("register_alias", "latest")])
def test_path_escaping_names_are_refused_before_anything_is_written(tiny_prepared, tmp_path,
                                                                      flag, value):
    data_dir, _ = tiny_prepared
    victim = _precious(tmp_path / "victim", marker=True)  # even a run of ours elsewhere
    value = str(victim) if value == "ABSOLUTE" else value
    out = tmp_path / "runs"
    # (an alias needs a registered model name: RunConfig checks that rule too)
    needs = {"register_model_name": "seg"} if flag == "register_alias" else {}
    cfg = _cfg(data_dir, out, overwrite=True, **needs, **{flag: value})
    with pytest.raises(files.BadNameError, match=f"--{flag}={value!r}"):
        _train(cfg)
    assert _intact(victim) and not out.exists()


def test_run_dir_that_links_out_of_output_dir_is_refused(tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    victim = _precious(tmp_path / "victim", marker=True)
    out = tmp_path / "runs"
    out.mkdir()
    os.symlink(victim, out / "run")
    with pytest.raises(files.BadNameError, match="--run_name: .* outside"):
        _train(_cfg(data_dir, out, overwrite=True))
    assert _intact(victim)


# -- 2. --overwrite ------------------------------------------------------------------------

def test_overwrite_then_a_failing_check_leaves_the_old_run_intact(tiny_prepared, tmp_path):
    """The init checkpoint is only found missing after the model is built; the old run must
    still be there (it used to be removed first)."""
    data_dir, _ = tiny_prepared
    old = _precious(tmp_path / "runs" / "run", marker=True)
    cfg = _cfg(data_dir, tmp_path / "runs", overwrite=True,
               init_checkpoint=str(tmp_path / "nonexistent.weights.h5"))
    with pytest.raises(app.UsageError, match="--init_checkpoint=.*no such file"):
        _train(cfg)
    assert _intact(old) and sorted(os.listdir(old)) == [files.MARKER_FILE, "precious.txt"]


def test_overwrite_refuses_a_directory_uda_tf_did_not_create(tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    foreign = _precious(tmp_path / "runs" / "run")
    with pytest.raises(files.NotOurDirectoryError, match=f"refuses to remove {foreign}"):
        _train(_cfg(data_dir, tmp_path / "runs", overwrite=True))
    assert _intact(foreign) and os.listdir(foreign) == ["precious.txt"]


def test_claim_empties_our_run_in_place_under_its_lock(tmp_path):
    """--overwrite of a run of ours: emptied (the lock file kept, so the directory is never
    unlocked), marked again, and locked until the run ends."""
    import contextlib
    from uda_tf.cli import train
    run_dir = _precious(tmp_path / "run", marker=True)
    os.makedirs(run_dir / "backup" / "step-000000001")
    cfg = SimpleNamespace(resume=False, overwrite=True)
    with contextlib.ExitStack() as hold:
        train.claim_run_dir(cfg, str(run_dir), hold)
        assert sorted(os.listdir(run_dir)) == [files.LOCK_FILE, files.MARKER_FILE]
        holder = json.loads((run_dir / files.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
    assert os.listdir(run_dir) == [files.MARKER_FILE]  # lock released with the run
    # without --overwrite, a run that appeared since the start-up check is refused
    _precious(run_dir)
    with contextlib.ExitStack() as hold, pytest.raises(app.UsageError, match="exists"):
        train.claim_run_dir(SimpleNamespace(resume=False, overwrite=False), str(run_dir), hold)
    assert _intact(run_dir)


# -- 3. one writer per run -----------------------------------------------------------------

def test_second_writer_on_the_same_run_is_refused_naming_the_holder(tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    run_dir = _precious(tmp_path / "runs" / "run", marker=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from uda_tf import files
            with files.OutputLock({str(run_dir)!r}, "train --run_name"):
                print("locked", flush=True)
                sys.stdin.read()
            """)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.OutputLockedError,
                           match=f"is being written by pid {holder.pid} "):
            _train(_cfg(data_dir, tmp_path / "runs", resume=True))
    finally:
        holder.communicate("", timeout=30)
    assert _intact(run_dir)


# -- 4. --resume ---------------------------------------------------------------------------

def test_resume_needs_a_run_to_resume(tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    with pytest.raises(app.UsageError, match="--resume: there is nothing to resume: the run "
                                             "directory .*runs/run does not exist"):
        _train(_cfg(data_dir, tmp_path / "runs", resume=True))
    assert not (tmp_path / "runs" / "run").exists()
    foreign = _precious(tmp_path / "runs" / "run")
    with pytest.raises(app.UsageError, match="nothing to resume in .*not a run of uda_tf"):
        _train(_cfg(data_dir, tmp_path / "runs", resume=True))
    assert os.listdir(foreign) == ["precious.txt"]


def test_resume_of_our_run_without_a_backup_starts_from_scratch(tiny_prepared, tmp_path,
                                                                caplog):
    """A run that stopped before its first backup (only its marker and flags.cfg): trained
    from scratch in the same directory, with a warning; its lock is gone afterwards."""
    data_dir, _ = tiny_prepared
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    files.mark_created(str(run_dir), "run")
    (run_dir / "flags.cfg").write_text("# stopped early\n")
    with caplog.at_level("WARNING"):
        result = _train(_cfg(data_dir, tmp_path / "runs", resume=True))
    assert "has no training backup yet" in caplog.text
    assert result["run_dir"] == str(run_dir) and (run_dir / "result.json").is_file()
    assert not (run_dir / files.LOCK_FILE).exists() and files.created_by_us(str(run_dir))


# -- 5. splits -----------------------------------------------------------------------------

def _without(data_dir, tmp_path, domain, split):
    """A copy of the prepared dataset whose `domain` has no `split` (manifest re-stamped)."""
    from uda_tf.data.manifest import content_hash
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["domains"][domain]["cases"].pop(split)
    manifest["shards"] = [s for s in manifest["shards"]
                          if (s["domain"], s["split"]) != (domain, split)]
    manifest["content_hash"] = content_hash(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return str(copy)


@pytest.mark.parametrize("domain,split,method,expected", [
    ("dom_a", "train", "source_only", "--source_domain='dom_a' has no train records to train "
                                      "on; its splits: test (10 records), val (10 records)"),
    ("dom_b", "train", "grl", "--target_domain='dom_b' has no train images, which "
                              "--method=grl read; its splits: test (15 records), val (10 records)"),
])
def test_missing_split_is_named_before_a_run_exists(tiny_prepared, tmp_path, domain, split,
                                                    method, expected):
    data_dir, _ = tiny_prepared
    data = _without(data_dir, tmp_path, domain, split)
    with pytest.raises(app.UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _train(_cfg(data, tmp_path / "runs", method=method))
    assert not (tmp_path / "runs").exists()  # no run directory, no MLflow store


# -- 8. what the command prints --------------------------------------------------------------

def test_cli_turns_known_conditions_into_errors(tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    victim = _precious(tmp_path / "victim", marker=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": "uda_tf-prepared", "vers')
    common = ["--source_domain=dom_a", f"--output_dir={tmp_path}/runs"]
    proc = run_cli("uda_tf.cli.train", common + [f"--data_dir={data_dir}",
                                                 "--run_name=../victim", "--overwrite"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train: error: --run_name='../victim' must be a plain name" in proc.stderr
    assert _intact(victim)
    proc = run_cli("uda_tf.cli.train", common + [f"--data_dir={broken}"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--data_dir={broken}: cannot read {broken}/manifest.json" in proc.stderr
