"""Test session set-up: three logical CPU devices, configured before TensorFlow initialises
them.

Distribution tests run MirroredStrategy over the first two (`two_replicas`) or all three
(`three_replicas`: a replica count that divides no even batch, for partial final batches);
single-device tests use OneDeviceStrategy("/cpu:0") in the same process
(logical devices can only be configured before TensorFlow initialises them).

`make test` runs the tests in parallel processes (pytest-xdist, `--dist=loadfile`): each
process is set up as above and has its own temporary directories, and runs whole test files,
so a module fixture (a prepared dataset, an export, the e2e chains) is built once.
"""
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from uda_tf.training import devices  # noqa: E402

devices.split_cpu(3)

# Grappler, TensorFlow's graph optimiser, spends more time optimising the tests' tiny graphs
# than it saves running them (about a fifth of an in-process training chain). It is off in
# the test processes only: the tests that start train.py as a user does (test_train_cli,
# test_resume_cli, test_multiworker_cli, ...) and the demo run with it, as users do.
import tensorflow as tf  # noqa: E402

tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def pytest_collection_modifyitems(config, items):
    """Files with a test marked `slow` move to the front, whole and otherwise in order: xdist
    hands out files in this order (`--no-loadscope-reorder`), so the longest start first and
    no process is left alone with one at the end (longest-first scheduling). pytest-xdist's
    `xdist_group` is not used: with pytest 9.2 its renamed node ids are ignored (xdist 3.8 sets
    `Item._nodeid`, pytest now reads `Item._id`), so groups were silently split."""
    modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: getattr(item, "module", None) is None
               or item.module.__name__ not in modules)


@pytest.fixture
def one_device():
    import tensorflow as tf
    return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.fixture
def two_replicas():
    return devices.mirrored_cpus(2)


@pytest.fixture
def three_replicas():
    return devices.mirrored_cpus(3)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """The tiny two-domain MSD dataset of tests/helpers.py, prepared to 16x24 slices."""
    from tests.helpers import make_msd
    from uda_tf.data.prepare import prepare
    raw = make_msd(tmp_path_factory.mktemp("tiny_raw"))
    out = tmp_path_factory.mktemp("tiny_prepared")
    manifest = prepare(str(raw), str(out), size=(16, 24), records_per_shard=8, workers=1,
                       verbose=False)
    return str(out), manifest


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """`mlflow_store(directory, name="mlflow.db")` puts an empty sqlite MLflow store there and
    returns its URI. A fresh store spends ~3 s in MLflow's schema migrations, in every train.py
    run that opens one; these are copies of one store migrated once per test process, as a
    first run would leave it (its Default experiment points at the template's folder; the tests
    name their experiments). A copy also avoids two runs migrating one new file at once, which
    races ("table _alembic_tmp_experiments already exists")."""
    import mlflow
    template = str(tmp_path_factory.mktemp("mlflow_template") / "mlflow.db")
    mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()

    def make(directory, name="mlflow.db"):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(str(directory), name)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    return make
