"""A new method is one module plus its registration: tests/methods/toy_method.py, imported
here and nowhere else, gets its setting as a generated train.py flag, trains through
train.train, resumes from its backup (every optimizer restored) and exports."""
import json
import os

import pytest

import tests.methods.toy_method  # noqa: F401  (registers --method=toy)


def _values(data_dir, out, **overrides):
    from absl import flags
    from uda_tf.cli import train
    train.define_flags()  # adds the toy's flag and --method value if defined before
    values = {name: flags.FLAGS[name].default for name in train._NAMES}
    values.update(data_dir=data_dir, source_domain="dom_a", target_domain="dom_b",
                  method="toy", toy_l2_weight=0.5, epochs=1, steps_per_epoch=2,
                  global_batch_size=2, base_filters=2, unet_depth=2, output_dir=str(out),
                  run_name="toy",
                  mlflow_tracking_uri=f"sqlite:///{out}/mlflow.db", mlflow_experiment="t",
                  mlflow_sample_slices=0, figures=False, model_name="toy", check_shards=False,
                  backup_every_steps=1, target_criteria=False, mlflow_input_example=False,
                  mlflow_system_metrics=False)
    values.update(overrides)
    return values


def test_toy_setting_is_a_generated_flag():
    from absl import flags
    from uda_tf.cli import train
    train.define_flags()
    assert "toy_l2_weight" in train._NAMES
    assert flags.FLAGS["toy_l2_weight"].default == 0.01
    assert flags.FLAGS["toy_l2_weight"].parser.lower_bound == 0
    assert "toy" in flags.FLAGS["method"].parser.enum_values
    from uda_tf.methods import METHODS
    with pytest.raises(ValueError, match=r"--toy_l2_weight must be >= 0, got -1.0"):
        METHODS["toy"].configure({"toy_l2_weight": -1.0})


def test_toy_trains_resumes_and_exports(tiny_prepared, tmp_path):
    from uda_tf.cli import train
    from uda_tf.serving.export import export_checkpoint
    from uda_tf.training import resume
    from uda_tf.training.config import RunConfig
    data_dir, _ = tiny_prepared
    result = train.train(RunConfig.from_flags(_values(data_dir, tmp_path)))
    run_dir = result["run_dir"]
    backups = resume.list_backups(os.path.join(run_dir, resume.BACKUP_DIR))
    state = json.loads(open(os.path.join(backups[-1], "state.json")).read())
    # the probe's optimizer is backed up though the toy module never mentions backups
    assert state["groups"]["optimizer/probe_optimizer"] > 1
    assert state["groups"]["optimizer/seg_optimizer"] > 1
    assert state["batches"] == 2 and state["flags"]["toy_l2_weight"] == 0.5
    _, arrays = resume.read_backup(backups[-1])
    probe_iterations = [v for k, v in arrays.items() if k.startswith("optimizer.probe_optimizer")]
    assert any(v.shape == () and int(v) == 2 for v in probe_iterations)  # stepped twice

    # --resume restores every group (a count mismatch, e.g. a forgotten optimizer, raises)
    again = train.train(RunConfig.from_flags(_values(data_dir, tmp_path, resume=True)))
    assert again["run_dir"] == run_dir and os.path.isdir(again["saved_model"])

    exported = export_checkpoint(run_dir, export_root=str(tmp_path / "export"),
                                 warmup_batch_sizes=(1,))
    assert os.path.isfile(os.path.join(exported, "saved_model.pb"))
