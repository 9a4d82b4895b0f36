"""RunConfig: train.py's flags are generated from it, it checks what absl checked (with the
same messages), and what a run saves (config.json, or an older run's flags.cfg) reads back to
the same config."""
import json

import pytest

from uda_tf.training.config import CONFIG_FILE, RunConfig, read_run_config, run_config_file


def _flags():
    """train.py's flags, defined once per process: name -> absl Flag."""
    from absl import flags
    from uda_tf.cli import train
    train.define_flags()
    return {name: flags.FLAGS[name] for name in train._NAMES}


def _resolved(**overrides):
    """Flag values as absl resolves them (list flags as lists of strings)."""
    values = {name: flag.default for name, flag in _flags().items()}
    values.update(overrides)
    return values


def _adversarial():
    return RunConfig.from_flags(_resolved(
        method="adversarial", model="unet3d", patch_size=["16", "16", "8"],
        class_weights=["0.5", "1", "2"], augment_params=["rotation_degrees=10",
                                                         "noise_std=0:0.05"],
        adv_discriminators="feature", adv_both_domains=True, epochs=3, run_name="r",
        resume=True, sync_batchnorm=False, data_dir="/data"))


def test_every_run_setting_is_a_flag_with_its_declaration():
    from uda_tf.methods import settings
    flags = _flags()
    for f in settings.fields(RunConfig):
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert flags[f.name].default == default, f.name
        assert flags[f.name].help.endswith(f.metadata["help"]), f.name  # enums: <a|b>: ...
    assert flags["epochs"].parser.lower_bound == 1
    assert flags["fda_beta"].parser.upper_bound == 0.5
    assert flags["model"].parser.enum_values[0] == "unet2d"
    # flag_values() lists the flags in the order train.py defines them (flags.cfg's order)
    cfg = _adversarial()
    order = [name for name in flags if name in cfg.flag_values()]
    assert list(cfg.flag_values()) == order


def test_values_are_typed_and_the_method_config_is_checked():
    cfg = _adversarial()
    assert cfg.patch_size == (16, 16, 8) and cfg.epochs == 3
    assert cfg.augment_params == ("rotation_degrees=10", "noise_std=0:0.05")
    assert cfg.method_config.class_weights == (0.5, 1.0, 2.0)
    assert cfg.method_config.adv_discriminators == "feature"
    assert cfg.flag_values()["adv_both_domains"] is True
    assert cfg.replace(epochs=5).epochs == 5 and cfg.epochs == 3  # frozen: a copy
    with pytest.raises(Exception):
        cfg.epochs = 4


def test_json_round_trip(tmp_path):
    cfg = _adversarial()
    path = str(tmp_path / CONFIG_FILE)
    cfg.save(path)
    data = json.load(open(path))
    assert data["version"] == 1 and data["flags"]["patch_size"] == [16, 16, 8]
    assert RunConfig.load(path) == cfg
    assert run_config_file(str(tmp_path)) == path and read_run_config(path) == cfg


def test_flags_cfg_reads_as_the_same_values(tmp_path):
    """A flags.cfg as train.py writes it (runs made before config.json) gives the config that
    the same values give from the flags."""
    from uda_tf.cli.train import flagfile_text
    cfg = _adversarial()
    path = tmp_path / "flags.cfg"
    path.write_text(flagfile_text(cfg.flag_values()) + "--some_flag_of_long_ago=1\n")
    assert "--patch_size=16,16,8" in path.read_text()
    assert "--class_weights=0.5,1,2" in path.read_text()
    assert "--nosync_batchnorm" in path.read_text()
    assert RunConfig.from_flagfile(str(path)) == cfg
    assert run_config_file(str(tmp_path)) == str(path)  # no config.json: the old run's file
    # flags a file leaves out take their defaults
    (tmp_path / "short.cfg").write_text("--base_filters=4\n--norm=batch\n--noaugment\n")
    short = RunConfig.from_flagfile(str(tmp_path / "short.cfg"))
    assert (short.base_filters, short.norm, short.augment) == (4, "batch", "default")


@pytest.mark.parametrize("overrides,message", [
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
    ({"fda_beta": 0.7}, "--fda_beta must be <= 0.5, got 0.7"),
    ({"norm": "layer"}, "--norm='layer': expected one of instance, batch, group"),
    ({"method": "nope"}, "--method='nope': expected one of"),
    ({"global_batch_size": "x"}, "--global_batch_size='x': expected a number"),
    ({"patch_size": ["64", "64"]}, "--patch_size=64,64: expected three positive integers"),
    ({"augment": "flip,warp"}, "--augment='flip,warp': expected a preset (none, flip, default"),
    ({"augment_params": ["rotation_deg=5"]},
     "--augment_params: 'rotation_deg=5' must be name=value"),
    ({"resume": True}, "--resume needs --run_name: the run directory to continue"),
    ({"register_alias": "champion"}, "--register_alias needs --register_model_name"),
    ({"minent_weight": -1.0}, "--minent_weight must be >= 0, got -1.0"),
    ({"method": "adversarial", "adv_discriminators": "entropy", "adv_both_domains": True},
     "--adv_both_domains applies to the feature discriminator"),
])
def test_a_bad_value_names_its_flag(overrides, message):
    with pytest.raises(ValueError) as err:
        RunConfig.from_flags(_resolved(**overrides))
    assert message in str(err.value)


def test_a_file_that_is_no_config_is_named(tmp_path):
    for text in ("{not json", '["a list"]', '{"version": 1}', '{"version": 9, "flags": {}}'):
        path = tmp_path / CONFIG_FILE
        path.write_text(text)
        with pytest.raises(ValueError, match=str(path)):
            RunConfig.load(str(path))
    (tmp_path / "flags.cfg").write_text("--epochs=0\n")
    with pytest.raises(ValueError, match=r"flags.cfg: --epochs must be >= 1"):
        RunConfig.from_flagfile(str(tmp_path / "flags.cfg"))
    assert run_config_file(str(tmp_path / "nowhere")) is None


def test_resume_compares_the_flags_of_this_runs_config():
    """A backup holds the flags of the run that made it; settings of other methods (which
    backups made before RunConfig held) are not this run's and are not compared."""
    from uda_tf.training.resume import flag_differences
    current = _adversarial().flag_values()
    saved = {**current, "grl_lambda": 2.0, "epochs": 2}
    assert flag_differences(saved, current) == ["--epochs: backup 2, now 3"]
    assert flag_differences({}, {"epochs": 3}) == ["--epochs: backup None, now 3"]
