"""Every shipped config parses with train.py's flags (one subprocess for all of them), names
a registered method, and carries its run command on line 1."""
import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.cfg")))

_PARSE = """
import json, sys
from absl import flags
from uda_tf.cli import train
train.define_flags()
out = {}
for path in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", "--flagfile=" + path])
    out[path] = {"method": flags.FLAGS.method, "epochs": flags.FLAGS.epochs,
                 "data_dir": flags.FLAGS.data_dir}
print(json.dumps(out))
"""


def test_every_config_parses_and_names_its_run_command():
    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        first = open(path).readline()
        assert first.startswith("# python train.py --flagfile=configs/"), path
        assert os.path.basename(path) in first, path
    proc = subprocess.run([sys.executable, "-c", _PARSE, *CONFIGS], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    from uda_tf.methods import METHODS
    for path, values in parsed.items():
        assert values["method"] in METHODS and values["data_dir"], (path, values)
    by_name = {os.path.basename(p): v for p, v in parsed.items()}
    # configs that build on demo.cfg inherit its data and budget but set their own method
    assert by_name["self_training_demo.cfg"]["method"] == "self_training"
    assert by_name["adabn_demo.cfg"]["epochs"] == by_name["demo.cfg"]["epochs"]
