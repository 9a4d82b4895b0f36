"""The training command as a user runs it. Two tiny runs through train.py's flags and main
(tests/cli_runner.py) share the checks of a whole run: GRL on 2 logical CPU replicas with strong
augmentation, FDA, mixed precision and label-free checkpoint selection, tracked in MLflow
(params, per-epoch metrics, plots, sample segmentations, a registered model), and a source-only
run on 3 replicas with a partial last validation batch whose MLflow server is unreachable
(training finishes, keeps what it could not send, and validates exactly the real slices).
Then the errors a user gets for bad flags or missing data, one from a real process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cli_runner import run_cli
from tests.helpers import free_ports
from uda_tf.training import tracking

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_here(*args):
    """`python train.py *args` through the CLI's flags and main in this process
    (tests/cli_runner.py): what a user gets, without a TensorFlow start-up per run."""
    return run_cli("uda_tf.cli.train", args)


def _train(*args, timeout=600):
    """train.py as a user runs it, in a new process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store):
    """A sqlite store the offline run's unsent values are replayed into."""
    return mlflow_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory, mlflow_store):
    """Both trainings from one flagfile, each through train.py's command line in this process:
    "online" (GRL, 2 replicas, tracked, model registered) and "offline" (source-only on 3
    replicas with a partial last validation batch, the MLflow server unreachable)."""
    data_dir, manifest = tiny_prepared
    tmp = tmp_path_factory.mktemp("tracking")
    flagfile = tmp / "tiny_exp.cfg"
    flagfile.write_text("\n".join([
        f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
        "--epochs=2", "--steps_per_epoch=2", "--global_batch_size=4",
        "--base_filters=2", "--unet_depth=2", f"--output_dir={tmp}/runs", "--model_name=tiny",
        "--mlflow_sample_slices=3"]) + "\n")
    uri = mlflow_store(tmp)
    offline_uri = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    commands = {
        "online": [f"--flagfile={flagfile}", "--run_name=online", f"--mlflow_tracking_uri={uri}",
                   "--register_model_name=tiny_seg", "--register_alias=champion",
                   "--method=grl", "--num_cpu_devices=2", "--select_on=target_entropy",
                   "--augment=full", "--target_augment=flip,gamma",
                   "--augment_params=rotation_degrees=10,noise_std=0:0.05", "--fda_beta=0.05",
                   "--mixed_precision"],  # bfloat16 on CPU; the export must still be float32
        # 3 replicas, batches of 8: the last of the 10 validation slices' batches has 2
        "offline": [f"--flagfile={flagfile}", "--run_name=offline", "--method=source_only",
                    "--num_cpu_devices=3", "--global_batch_size=8",
                    f"--mlflow_tracking_uri={offline_uri}", "--mlflow_experiment=explicit",
                    "--nomlflow_input_example"],
    }
    results = {}
    for name, args in commands.items():
        proc = run_cli("uda_tf.cli.train", args)
        results[name] = (proc.returncode, proc.stdout, proc.stderr, tmp / "runs" / name)
    return results, uri, manifest


@pytest.mark.slow
def test_grl_run_end_to_end(runs):
    (code, _, err, run_dir), uri, manifest = runs[0]["online"], runs[1], runs[2]
    assert code == 0, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert (run_dir / "checkpoints" / "best.weights.h5").is_file()
    saved_flags = (run_dir / "checkpoints" / "flags.cfg").read_text()
    assert "--method=grl" in saved_flags and "--augment=full" in saved_flags
    assert "--augment_params=rotation_degrees=10,noise_std=0:0.05" in saved_flags
    assert result["saved_model"] == str(run_dir / "export" / "tiny" / "1")

    target = result["evaluations"]["target"]["summary"]
    assert target["oracle"] is True and result["evaluations"]["source"]["summary"]["oracle"] is False
    assert set(target["classes"]) == {"left", "front"}
    for stats in target["classes"].values():
        assert 0.0 <= stats["dice"]["mean"] <= 1.0 and stats["dice"]["n"] == 1
    rows = (run_dir / "eval" / "target_test" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("case,class,label,dice") and len(rows) == 1 + 2

    import tensorflow as tf
    serve = tf.saved_model.load(result["saved_model"]).signatures["serving_default"]
    out = serve(image=tf.zeros([3, 16, 24, 1]))
    assert out["probabilities"].shape == (3, 16, 24, 3) and out["labels"].shape == (3, 16, 24)
    # trained in mixed bfloat16, served in float32 (no bfloat16 anywhere in the graph)
    assert "DT_BFLOAT16" not in str(serve.graph.as_graph_def())

    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "grl" and run.data.params["epochs"] == "2"
    assert run.data.tags["dataset_content_hash"] == manifest["content_hash"]
    assert run.data.tags["replicas"] == "2"
    history = client.get_metric_history(run.info.run_id, "seg_loss")
    assert [m.step for m in history] == [0, 1]
    assert np.isfinite([m.value for m in history]).all()
    # every volume metric of the test evaluations; target numbers only under oracle/
    for metric in ("dice", "surface_dice", "assd", "hd95"):
        assert f"oracle/target_test/{metric}_mean" in run.data.metrics
        assert f"source_test/{metric}_mean" in run.data.metrics
    assert not any(k.startswith("target_test") for k in run.data.metrics)
    # the checkpoint followed the label-free target criterion, recorded with its epoch
    selection = result["selection"]
    assert selection["select_on"] == "target_entropy" and selection["monitor"] == "target_entropy"
    entropies = [m.value for m in client.get_metric_history(run.info.run_id, "target_entropy")]
    assert len(entropies) == 2 and 0.0 <= min(entropies) <= 1.0
    assert selection["best"] == pytest.approx(min(entropies), rel=1e-6)
    assert selection["best_epoch"] == int(np.argmin(entropies))
    assert result["best_val_dice"] == selection["epoch_logs"]["val_dice"]
    # target validation labels exist here, so oracle/val_dice is reported (not used)
    assert len(client.get_metric_history(run.info.run_id, "oracle/val_dice")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"flags.cfg", "manifest.json", "eval"} <= artifacts


@pytest.mark.slow
def test_run_logs_params_metrics_artifacts_and_model(runs):
    import mlflow
    (code, _, err, run_dir), uri, manifest = runs[0]["online"], runs[1], runs[2]
    assert code == 0, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    run_id = result["mlflow"]["run_id"]
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == run_id
    assert not (run_dir / tracking.UNSENT_FILE).exists()

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "online"
    # one experiment per config: named after the flagfile
    assert client.get_experiment(run.info.experiment_id).name == "tiny_exp"
    for line in (run_dir / "flags.cfg").read_text().splitlines()[1:]:  # every resolved flag
        name = line[2:].split("=")[0]
        assert name in run.data.params or name[2:] in run.data.params  # --noflag
    assert run.data.params["epochs"] == "2"
    assert run.data.params["mlflow_experiment"] == "tiny_exp"
    assert run.data.tags["dataset_content_hash"] == manifest["content_hash"]
    for name in ("seg_loss", "val_dice", "val_seg_loss"):
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == [0, 1]
        assert np.isfinite([m.value for m in history]).all()

    # artifacts next to the sqlite store, not in ./mlruns of the working directory
    assert run.info.artifact_uri.startswith(str(run_dir.parent.parent))
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"flags.cfg", "manifest.json", "eval", "plots", "samples"} <= listed
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/seg_loss.png", "plots/dice.png", "plots/domain_gap.png"} <= plots
    # the test metrics as one table: domain x class x metric, the target as oracle
    assert {"test_metrics.csv", "test_metrics.json"} <= listed
    with open(client.download_artifacts(run_id, "test_metrics.json")) as f:
        table = json.load(f)
    rows = {(r[0], r[1], r[2], r[3]) for r in table["data"]}
    assert ("source", "dom_a", "mean", "dice") in rows
    assert ("oracle/target", "dom_b", "mean", "hd95") in rows
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"])[0]["type"] == "table"
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/segmentations.png"]
    local = client.download_artifacts(run_id, "samples/segmentations.png")
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the SavedModel as an MLflow model, registered under an alias, predicting as served
    version = client.get_model_version_by_alias("tiny_seg", "champion")
    assert version.run_id == run_id
    assert result["mlflow"]["model"]["registered_model"] == "tiny_seg"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/tiny_seg@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    # with an input example (one blank slice), which MLflow served through the model
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    import tensorflow as tf
    x = np.random.default_rng(0).random((2, 16, 24, 1), dtype=np.float32)
    got = model.predict(x)
    serve = tf.saved_model.load(result["saved_model"]).signatures["serving_default"]
    expected = serve(image=tf.constant(x))
    np.testing.assert_array_equal(got["labels"], expected["labels"].numpy())
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"].numpy(),
                               atol=1e-6)

    # the run's description, its dataset input (the manifest's hash as digest), and the
    # logged model: named after the run, carrying the kept epoch's metrics
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**grl**") and "`dom_a` (labelled)" in note and "target_entropy" in note
    inputs = [(d.dataset.name, d.dataset.digest, [t.value for t in d.tags])
              for d in run.inputs.dataset_inputs]
    assert inputs == [(manifest["dataset_name"], manifest["content_hash"][:32], ["training"])]
    logged = client.get_logged_model(result["mlflow"]["model"]["model_uri"].split("/")[-1])
    assert logged.name == "online"
    kept = {m.key: m for m in logged.metrics}
    best = result["selection"]["best_epoch"]
    assert {m.step for m in kept.values()} == {best}
    assert kept["val_dice"].value == pytest.approx(result["best_val_dice"])
    assert kept["target_entropy"].value == pytest.approx(result["selection"]["best"])
    assert kept["best_epoch"].value == best
    assert any(k.startswith("source_test/") for k in kept)


def test_unreachable_server_never_stops_training(runs, store):
    import mlflow
    code, out, err, run_dir = runs[0]["offline"]
    assert code == 0, err[-3000:]
    assert (run_dir / "result.json").is_file()
    assert "could not log" in err and "mlflow_unsent.json" in err
    assert err.count("Retrying at the next epoch") == 1  # warned once, not per epoch
    unsent = json.loads((run_dir / tracking.UNSENT_FILE).read_text())
    assert unsent["experiment"] == "explicit"  # an explicit flag beats the flagfile's name
    pending = unsent["pending"]
    assert pending["params"]["run_name"] == "offline"
    assert {m["step"] for m in pending["metrics"] if m["key"] == "seg_loss"} == {0, 1}
    assert pending["model"]["saved_model"].endswith(os.path.join("export", "tiny", "1"))
    assert pending["model"]["name"] == "offline" and pending["inputs"][0]["context"] == "training"

    # Later, with a store that answers: the replay sends everything and removes the file.
    info = tracking.replay_unsent(str(run_dir / tracking.UNSENT_FILE), store)
    assert not (run_dir / tracking.UNSENT_FILE).exists()
    client = mlflow.MlflowClient(store)
    run = client.get_run((run_dir / tracking.RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FINISHED" and run.data.params["method"] == "source_only"
    assert len(client.get_metric_history(run.info.run_id, "seg_loss")) == 2
    assert info["model_uri"].startswith("models:/")
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [
        pending["inputs"][0]["digest"]]
    assert client.get_logged_model(info["model_uri"].split("/")[-1]).name == "offline"


def test_three_replicas_with_a_partial_last_validation_batch(runs, tiny_prepared):
    """The offline run: 10 validation slices in batches of 8 on 3 replicas. The last batch of 2
    left a replica without a sample (InvalidArgumentError, a FAILED MLflow run). Now the run
    finishes and its val_dice is the Dice of the checkpoint on the 10 slices, computed on one
    device; the label-free criteria and oracle/val_dice (read outside the strategy) match too."""
    from uda_tf.data import pipeline
    from uda_tf.metrics import StreamingDice
    from uda_tf.models import segmentor_from_flags
    from uda_tf.training.config import read_run_config, run_config_file
    from uda_tf.training.selection import TargetCriteria
    code, _, err, run_dir = runs[0]["offline"]
    assert code == 0, err[-3000:]
    data_dir, manifest = tiny_prepared
    assert manifest.num_records("dom_a", "val") == 10
    result = json.loads((run_dir / "result.json").read_text())
    cfg = read_run_config(run_config_file(os.path.dirname(result["checkpoint"])))
    assert cfg.num_cpu_devices == 3 and cfg.global_batch_size == 8 and cfg.target_criteria
    logs = result["selection"]["epoch_logs"]

    seg = segmentor_from_flags(cfg.flag_values(), manifest)
    seg.load_weights(result["checkpoint"])
    dice = StreamingDice(["background", "left", "front"])
    for images, labels in pipeline.eval_dataset(data_dir, manifest, "dom_a", "val",
                                                batch_size=10):
        dice.update_state(labels, seg(images, training=False)["logits"])
    assert logs["val_dice"] == pytest.approx(float(dice.result()["dice"]), abs=1e-5)
    criteria = TargetCriteria(lambda: pipeline.eval_dataset(
        data_dir, manifest, "dom_b", "val", batch_size=10, with_metadata=True),
        class_names=["background", "left", "front"]).compute(seg)
    for name in ("target_entropy", "target_agreement", "oracle/val_dice"):
        assert logs[name] == pytest.approx(criteria[name], abs=1e-5), name
    assert os.path.isdir(result["saved_model"])


def test_selection_needs_what_it_reads():
    from absl import app
    from types import SimpleNamespace
    from uda_tf.cli.train import check_selection
    from uda_tf.data.manifest import Manifest
    manifest = Manifest({
        "domains": {"a": {"cases": {"val": ["a1"]}}, "b": {"cases": {"val": ["b1"]}},
                    "c": {"cases": {"test": ["c1"]}}},
        "cases": {"a1": {"has_label": True}, "b1": {"has_label": False},
                  "c1": {"has_label": True}}})
    cfg = lambda **kw: SimpleNamespace(**{"select_on": "source_dice", "target_domain": "b",  # noqa: E731
                                          **kw})
    check_selection(manifest, cfg())
    check_selection(manifest, cfg(select_on="target_entropy"))
    with pytest.raises(app.UsageError, match="--select_on=oracle needs target validation labels"):
        check_selection(manifest, cfg(select_on="oracle"))
    with pytest.raises(app.UsageError, match="--select_on=target_agreement needs --target_domain"):
        check_selection(manifest, cfg(select_on="target_agreement", target_domain="c"))
    check_selection(manifest, cfg(select_on="oracle", target_domain="a"))


def test_bad_flag_exits_nonzero_from_a_real_process():
    proc = _train("--bogus_flag=1", timeout=120)
    assert proc.returncode != 0
    assert "bogus_flag" in proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--bogus_flag=1"], "bogus_flag"),
    (["--method=nope", "--data_dir=x"], "--method"),
    (["--data_dir=/no/such/dir", "--dataset_source=get it from EXAMPLE"],
     "--data_dir=/no/such/dir"),
    (["--flagfile=configs/grl_crossmoda.cfg", "--data_dir=/no/crossmoda"],
     "crossmoda-challenge.ml"),
    (["--augment=flip,warp"], "--augment='flip,warp': expected a preset (none, flip, default"),
    (["--augment_params=rotation_deg=5"], "--augment_params: 'rotation_deg=5' must be name=value"),
    (["--patch_size=64,64"], "--patch_size=64,64: expected three positive integers"),
])
def test_bad_input_exits_nonzero_naming_it(args, expected):
    proc = _train_here(*args)
    assert proc.returncode != 0
    assert expected in proc.stderr
    if "EXAMPLE" in " ".join(args):
        assert "get it from EXAMPLE" in proc.stderr and "manifest.json" in proc.stderr


def test_fda_needs_a_method_with_target_batches(tiny_prepared):
    from absl import app

    from uda_tf.cli import train
    from uda_tf.training.config import RunConfig
    data_dir, _ = tiny_prepared
    cfg = RunConfig.from_flags(dict(method="source_only", data_dir=data_dir, dataset_source="",
                                    source_domain="dom_a", target_domain="dom_b",
                                    fda_beta=0.1))
    with pytest.raises(app.UsageError, match="--fda_beta=0.1 needs target batches"):
        train.train(cfg)


def test_summary_metrics_leave_out_statistics_of_no_case():
    """An evaluation where every mask of a class is empty has null distances (summary.json):
    they are not sent to MLflow (float(None) would end the run after training)."""
    from uda_tf.cli.train import summary_metrics
    none = {"mean": None, "std": None, "n": 0}
    stat = {"mean": 0.5, "std": 0.0, "n": 1}
    summary = {"classes": {"a": {"dice": stat, "surface_dice": stat, "assd": none, "hd95": none}},
               "foreground": {"dice": stat, "surface_dice": stat, "assd": none, "hd95": none}}
    out = summary_metrics(summary, "oracle/target_test")
    assert out == {"oracle/target_test/dice_a": 0.5, "oracle/target_test/dice_mean": 0.5,
                   "oracle/target_test/surface_dice_a": 0.5,
                   "oracle/target_test/surface_dice_mean": 0.5}
