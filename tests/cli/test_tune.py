"""python -m uda_tf.cli.tune: an Optuna study over train.py's flags (uda_tf/training/tuning.py),
each trial a child MLflow run of the study's run, resumable, the best flags written as a
flagfile that train.py reads."""
import types

import optuna
import pytest

from tests.cli_runner import run_cli
from uda_tf.training import tuning
from uda_tf.training.config import RunConfig

KNOWN = {"learning_rate": float, "norm": lambda v: {"batch": v, "instance": v}[v],
         "base_filters": int, "run_name": str}


@pytest.mark.parametrize("text, message", [
    ("learning_rate", "expected name=kind:arguments"),
    ("learning_rate=gauss:0:1", "expected name=kind:arguments"),
    ("nope=float:0:1", "no flag --nope"),
    ("run_name=choice:a|b", "cannot be searched"),
    ("learning_rate=float:1:0", "finite low < high"),
    ("learning_rate=logfloat:0:1", "low > 0"),
    ("learning_rate=float:x:1", "low:high numbers"),
    ("base_filters=int:1.5:4", "whole numbers"),
    ("norm=choice:batch", "two values or more"),
    ("norm=choice:batch|group", "'group' is not a value of --norm"),
])
def test_bad_search_terms_are_named(text, message):
    with pytest.raises(ValueError, match=message) as info:
        tuning.parse_space([text], KNOWN)
    assert text in str(info.value) or "twice" in str(info.value)


def test_space_and_suggestions():
    terms = tuning.parse_space(["learning_rate=logfloat:1e-4:1e-2", "norm=choice:batch|instance",
                                "base_filters=int:2:4"], KNOWN)
    trial = optuna.create_study().ask()
    values = {t.name: t.suggest(trial) for t in terms}
    assert 1e-4 <= values["learning_rate"] <= 1e-2 and values["norm"] in ("batch", "instance")
    assert values["base_filters"] in (2, 3, 4)
    with pytest.raises(ValueError, match="twice"):
        tuning.parse_space(["base_filters=int:2:4", "base_filters=int:1:2"], KNOWN)


def test_a_pruned_trial_stops_after_the_epoch():
    class Trial:
        reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return len(self.reported) == 2

    callback = tuning.ReportToTrial(Trial(), "val_dice")
    callback.set_model(types.SimpleNamespace(stop_training=False))  # what fit reads
    callback.on_epoch_end(0, {"val_dice": 0.5})
    callback.on_epoch_end(1, {"loss": 1.0})  # no value this epoch: nothing reported
    assert not callback.pruned and not callback.model.stop_training
    callback.on_epoch_end(2, {"val_dice": 0.4})
    assert callback.pruned and callback.model.stop_training and callback.last_epoch == 2
    assert Trial.reported == [(0, 0.5), (2, 0.4)]


@pytest.mark.slow
def test_study_runs_resumes_tracks_children_and_writes_the_best_flags(tiny_prepared, tmp_path,
                                                                     mlflow_store):
    import mlflow
    data_dir, _ = tiny_prepared
    uri = mlflow_store(tmp_path)
    args = [f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
            "--method=grl", "--epochs=1", "--steps_per_epoch=1", "--global_batch_size=2",
            "--base_filters=2", "--unet_depth=2", "--nofigures", "--notarget_criteria",
            "--nomlflow_input_example",
            "--nomlflow_system_metrics", "--backup_every_steps=0", f"--output_dir={tmp_path}",
            f"--mlflow_tracking_uri={uri}", "--mlflow_experiment=tune_test",
            "--search=learning_rate=logfloat:1e-4:1e-2", "--search=grl_lambda=float:0.01:1",
            "--study_name=s1", "--pruner=none"]
    proc = run_cli("uda_tf.cli.tune", [*args, "--trials=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trial 0:" in proc.stdout and "best trial 0" in proc.stdout
    # the same command with more trials resumes the study: one more trial, not two
    proc = run_cli("uda_tf.cli.tune", [*args, "--trials=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 trial(s) finished, 1 to run" in proc.stdout and "trial 1:" in proc.stdout

    study = optuna.load_study(study_name="s1",
                              storage=f"sqlite:///{tmp_path}/s1.study/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert {(tmp_path / f"s1_trial00{i}" / "result.json").is_file() for i in (0, 1)} == {True}
    best = RunConfig.from_flagfile(str(tmp_path / "s1.study" / "best.cfg"))
    assert best.learning_rate == pytest.approx(study.best_params["learning_rate"])
    assert best.method == "grl" and best.data_dir == str(data_dir)

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tune_test").experiment_id])
    parent = [r for r in runs if r.info.run_name == "s1"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["s1_trial000", "s1_trial001"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert parent[0].data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent[0].data.metrics["trials_complete"] == 2
