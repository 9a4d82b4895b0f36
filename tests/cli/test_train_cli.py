"""The training command as a user runs it: a tiny GRL run end to end on 2 logical CPU
replicas, and the errors a user gets for bad flags or missing data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cli_runner import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_here(*args):
    """`python train.py *args` through the CLI's flags and main in this process
    (tests/cli_runner.py): what a user gets, without a TensorFlow start-up per run."""
    return run_cli("uda_tf.cli.train", args)


def _train(*args, timeout=600):
    """train.py as a user runs it, in a new process. A tiny run takes ~60 s on an idle core; the limit allows for
    a machine loaded several times over (`make test` runs two test processes; 300 s was hit
    at a load average of 6-8 on 2 cores)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.mark.slow
def test_grl_run_end_to_end(tiny_prepared, tmp_path, mlflow_store):
    data_dir, manifest = tiny_prepared
    uri = mlflow_store(tmp_path)
    proc = _train(f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
                  "--method=grl", "--epochs=2", "--steps_per_epoch=2", "--global_batch_size=4",
                  "--base_filters=2", "--unet_depth=2", "--num_cpu_devices=2",
                  f"--output_dir={tmp_path}/runs",
                  "--run_name=tiny", f"--mlflow_tracking_uri={uri}", "--model_name=tiny",
                  "--mlflow_experiment=test", "--select_on=target_entropy", "--augment=full",
                  "--target_augment=flip,gamma",
                  "--augment_params=rotation_degrees=10,noise_std=0:0.05", "--fda_beta=0.05",
                  "--mixed_precision")  # bfloat16 on CPU; the export must still be float32
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
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
