"""The adversarial and entropy methods through the training command: a tiny run end to end,
the configs' data hints, and flag combinations that must be refused with the flag named."""
import json

import pytest

from tests.cli.test_train_cli import _train_here


@pytest.mark.slow
def test_adversarial_run_end_to_end(tiny_prepared, tmp_path, mlflow_store):
    data_dir, _ = tiny_prepared
    uri = mlflow_store(tmp_path)
    proc = _train_here(f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
                  "--method=adversarial", "--adv_loss=wgan-gp", "--patch_discriminators",
                  "--adv_both_domains", "--disc_steps=2", "--minent_weight=0.01",
                  "--epochs=1", "--steps_per_epoch=2", "--global_batch_size=4",
                  "--base_filters=2", "--unet_depth=2", f"--output_dir={tmp_path}/runs",
                  "--run_name=adv", f"--mlflow_tracking_uri={uri}", "--model_name=adv",
                  "--mlflow_experiment=test", "--mlflow_sample_slices=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "adv" / "result.json").read_text())
    from mlflow.tracking import MlflowClient
    metrics = MlflowClient(uri).get_run(result["mlflow"]["run_id"]).data.metrics
    for name in ("seg_loss", "ent_loss", "adv_loss", "d_loss_feature", "d_loss_entropy",
                 "d_acc_feature", "d_acc_entropy", "val_dice"):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= metrics["d_acc_entropy"] <= 1.0


@pytest.mark.parametrize("args,expected", [
    (["--flagfile=configs/entropy_cc359.cfg", "--data_dir=/no/cc359"],
     "sites.google.com/view/calgary-campinas-dataset"),
    (["--flagfile=configs/adversarial_demo.cfg", "--data_dir=/no/demo"], "uda_tf.cli.phantom"),
    (["--method=source_only", "--minent_weight=0.1", "--data_dir=/no/x"], "--minent_weight"),
    (["--method=minent", "--data_dir=/no/x"], "--minent_weight > 0"),
])
def test_configs_and_bad_flag_combinations(args, expected):
    proc = _train_here(*args)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
