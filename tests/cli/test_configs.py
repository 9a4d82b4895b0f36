"""Every shipped config (uda_tf/configs, `--flagfile=uda:NAME`) parses with train.py's flags
from any working directory (one subprocess for all of them), names a registered method,
carries its run command on line 1 and holds no path; in a user's config, relative paths are
relative to that config (uda_tf/cli/entry.py `expand_flagfiles`)."""
import json
import os
import subprocess
import sys

import pytest

from uda_tf.cli import entry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = entry.packaged_configs()

_PARSE = """
import json, sys
from absl import flags
from uda_tf.cli import entry, train
train.define_flags()
out = {}
for name in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", *entry.expand_flagfiles(["--flagfile=uda:" + name])])
    out[name] = {"method": flags.FLAGS.method, "epochs": flags.FLAGS.epochs,
                 "data_dir": flags.FLAGS.data_dir, "output_dir": flags.FLAGS.output_dir}
print(json.dumps(out))
"""


def test_every_shipped_config_parses_anywhere_and_names_its_run_command(tmp_path):
    assert len(NAMES) >= 7 and "demo" in NAMES
    for name in NAMES:
        with open(os.path.join(entry.CONFIG_DIR, f"{name}.cfg")) as f:
            first = f.readline()
        assert first.startswith(f"# python train.py --flagfile=uda:{name} "), name
    # the repository's configs/ is the same folder
    assert os.path.samefile(os.path.join(REPO, "configs"), entry.CONFIG_DIR)
    proc = subprocess.run([sys.executable, "-c", _PARSE, *NAMES], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,  # not the repository
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                               "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    from uda_tf.methods import METHODS
    for name, values in parsed.items():
        assert values["method"] in METHODS, (name, values)
        # a shipped config holds no path: the data and outputs are the user's
        assert values["data_dir"] is None and values["output_dir"] == "runs", (name, values)
    # configs that build on demo.cfg inherit its budget but set their own method
    assert parsed["self_training_demo"]["method"] == "self_training"
    assert parsed["adabn_demo"]["epochs"] == parsed["demo"]["epochs"]


def test_paths_in_a_config_are_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "base.cfg").write_text(
        "# shared\n--flagfile=uda:demo\n--output_dir=runs\n// also a comment\n")
    (tmp_path / "exp" / "my.cfg").write_text(
        "--flagfile=base.cfg\n--data_dir=../data/prepared\n--init_checkpoint=w.weights.h5\n"
        "--mlflow_tracking_uri=sqlite:///abs.db\n--run_name=r1\n")
    monkeypatch.chdir(tmp_path / "exp" / "..")
    args = entry.expand_flagfiles(["--flagfile", "exp/my.cfg", "--data_dir=here", "--", "-x"])
    expanded = [a for a in args if a.startswith("--")]
    assert f"--output_dir={tmp_path / 'exp' / 'runs'}" in expanded
    assert f"--data_dir={tmp_path / 'data' / 'prepared'}" in expanded
    assert f"--init_checkpoint={tmp_path / 'exp' / 'w.weights.h5'}" in expanded
    assert "--mlflow_tracking_uri=sqlite:///abs.db" in expanded and "--run_name=r1" in expanded
    assert "--method=source_only" in expanded  # from the shipped demo config
    # on the command line a path stays relative to the working directory; the later flag wins
    assert args[-3:] == ["--data_dir=here", "--", "-x"]


@pytest.mark.parametrize("arg, message", [
    ("--flagfile=uda:nope", "no config 'nope' ships with uda_tf; there are: "),
    ("--flagfile=uda:../demo", "no config '../demo'"),
    ("--flagfile=missing.cfg", "cannot read it"),
])
def test_bad_flagfiles_are_named(arg, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(entry.FlagfileError, match=message.replace("(", r"\(")):
        entry.expand_flagfiles([arg])


def test_a_flagfile_including_itself_is_named(tmp_path):
    (tmp_path / "a.cfg").write_text("--flagfile=b.cfg\n")
    (tmp_path / "b.cfg").write_text("--flagfile=a.cfg\n")
    with pytest.raises(entry.FlagfileError, match="includes itself"):
        entry.expand_flagfiles([f"--flagfile={tmp_path / 'a.cfg'}"])


def test_the_demo_flagfile_sets_its_budget_over_the_config(tmp_path):
    """make demo's runs read demo_out/train.cfg: the shipped config, then the demo's budget
    (which must replace the config's: it keeps the demo within 10 minutes) and its paths."""
    from absl import flags as absl_flags
    from uda_tf.cli import demo
    path = str(tmp_path / "train.cfg")
    demo.write_train_config(path, "uda:demo", "scanner_a", "scanner_b",
                            "sqlite:///" + str(tmp_path / "mlflow.db"), (3, 7))
    args = entry.expand_flagfiles([f"--flagfile={path}", "--method=grl"])
    values = absl_flags.FlagValues()
    absl_flags.DEFINE_integer("epochs", 0, "", flag_values=values)
    absl_flags.DEFINE_integer("steps_per_epoch", 0, "", flag_values=values)
    for name in ("method", "data_dir", "output_dir", "source_domain", "target_domain"):
        absl_flags.DEFINE_string(name, None, "", flag_values=values)
    values(["train.py", *[a for a in args if a.split("=")[0][2:] in values]])
    assert (values.epochs, values.steps_per_epoch) == (3, 7)
    assert values.method == "grl"  # the command line after the flagfile still wins
    assert values.data_dir == str(tmp_path / "prepared")
    assert values.output_dir == str(tmp_path / "runs")
    assert (values.source_domain, values.target_domain) == ("scanner_a", "scanner_b")
