"""The 3D path as a user runs it: prepare volumes, train a 3D U-Net on patches (GRL, 2 logical
CPU replicas, poly schedule with warm-up, class weights), validate on tiled patches, export,
evaluate the SavedModel on whole volumes by sliding window; then re-export from the checkpoint
the way `uda-export` does (the segmentor rebuilt from flags.cfg strings)."""
import json

import numpy as np
import pytest

from tests.cli.test_train_cli import _train_here


@pytest.fixture(scope="module")
def prepared_volumes(tmp_path_factory):
    from tests.helpers import make_msd
    from uda_tf.data.prepare import prepare
    raw = make_msd(tmp_path_factory.mktemp("raw3d"))
    out = tmp_path_factory.mktemp("prepared3d")
    manifest = prepare(str(raw), str(out), size=(16, 24), output="volumes", workers=1,
                       verbose=False)
    return str(out), manifest


@pytest.mark.slow
def test_unet3d_run_end_to_end(prepared_volumes, tmp_path, mlflow_store):
    data_dir, manifest = prepared_volumes
    assert manifest["output"]["records"] == "volumes"
    proc = _train_here(f"--data_dir={data_dir}", "--source_domain=dom_a", "--target_domain=dom_b",
                  "--method=grl", "--grl_features=encoder", "--model=unet3d",
                  "--patch_size=16,16,8", "--norm=batch", "--base_filters=2", "--unet_depth=2",
                  "--class_weights=0.5,1,1", "--lr_schedule=poly", "--warmup_steps=1",
                  "--epochs=1", "--steps_per_epoch=2", "--global_batch_size=2",
                  "--num_cpu_devices=2", "--shuffle_buffer=4", f"--output_dir={tmp_path}/runs",
                  "--run_name=tiny3d", f"--mlflow_tracking_uri={mlflow_store(tmp_path)}",
                  "--model_name=tiny3d", "--mlflow_experiment=test3d", "--mlflow_sample_slices=0",
                  "--nofigures", "--nomlflow_input_example")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny3d"
    result = json.loads((run_dir / "result.json").read_text())
    flags_cfg = (run_dir / "checkpoints" / "flags.cfg").read_text()
    assert "--patch_size=16,16,8" in flags_cfg and "--class_weights=0.5,1,1" in flags_cfg
    assert 0.0 <= result["best_val_dice"] <= 1.0  # validation on tiled source patches

    # Whole test volumes, scored on the prepared grid (one per domain in this dataset).
    for role, domain in (("source", "dom_a"), ("target", "dom_b")):
        summary = result["evaluations"][role]["summary"]
        cases = manifest["domains"][domain]["cases"]["test"]
        for stats in summary["classes"].values():
            assert stats["dice"]["n"] == len(cases) and 0.0 <= stats["dice"]["mean"] <= 1.0

    import tensorflow as tf
    from uda_tf.serving.export import export_checkpoint, load_serving_fn
    serve = load_serving_fn(result["saved_model"])
    patches = np.random.default_rng(0).random((2, 16, 16, 8, 1)).astype(np.float32)
    probs = serve(image=tf.constant(patches))["probabilities"].numpy()
    assert probs.shape == (2, 16, 16, 8, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    again = export_checkpoint(str(run_dir), warmup_batch_sizes=(1,))
    assert again.endswith("/2")
    reloaded = load_serving_fn(again)(image=tf.constant(patches))["probabilities"].numpy()
    np.testing.assert_allclose(reloaded, probs, atol=1e-6)
