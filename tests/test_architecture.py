"""The import contracts of .importlinter hold, and `lint-imports` would catch a break.

Layers point one way (data -> models / losses / metrics -> methods -> training -> evaluation /
serving -> cli) and no package has an import cycle among its modules. The check runs on the
package as it is, then on a copy with one deliberately wrong import each, which must fail,
naming the import."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(root: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([LINT, "--no-cache", "--no-logo", os.path.join(root, ".importlinter")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_package(tmp_path) -> str:
    root = str(tmp_path / "repo")
    shutil.copytree(os.path.join(REPO, "uda_tf"), os.path.join(root, "uda_tf"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.nii.gz", "*.h5"))
    shutil.copy(os.path.join(REPO, ".importlinter"), root)
    return root


def test_the_package_keeps_its_import_contracts():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, expected", [
    # data importing a method: a lower layer reaching up
    ("uda_tf/data/io.py", "from uda_tf.methods import base  # noqa",
     "uda_tf.data is not allowed to import uda_tf.methods"),
    # a method importing the training loop (how methods/base.py used to reach multiworker)
    ("uda_tf/methods/minent.py", "from uda_tf.training import resume  # noqa",
     "uda_tf.methods is not allowed to import uda_tf.training"),
    # export importing the client that imports it: a cycle inside one package
    ("uda_tf/serving/protocol.py", "from uda_tf.serving import client  # noqa",
     "No cycles are allowed in uda_tf.serving"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, expected):
    root = copy_package(tmp_path)
    path = os.path.join(root, module)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text + "\n" + line + "\n")
    result = lint(root)
    assert result.returncode != 0, result.stdout
    assert expected in " ".join(result.stdout.split()), result.stdout
