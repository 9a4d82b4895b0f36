"""Test session set-up: three logical CPU devices, configured before TensorFlow initialises
them.

Distribution tests run MirroredStrategy over the first two (`two_replicas`) or all three
(`three_replicas`: a replica count that divides no even batch, for partial final batches);
single-device tests use OneDeviceStrategy("/cpu:0") in the same process
(logical devices can only be configured before TensorFlow initialises them).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from uda_tf.training import devices  # noqa: E402

devices.split_cpu(3)


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
