"""Test session set-up: two logical CPU devices, configured before TensorFlow initialises them.

Distribution tests run MirroredStrategy over the two; single-device tests use
OneDeviceStrategy("/cpu:0") in the same process (shared/ARCHITECTURE.md, test harness notes).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from uda_tf.training import devices  # noqa: E402

devices.split_cpu(2)


@pytest.fixture
def one_device():
    import tensorflow as tf
    return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.fixture
def two_replicas():
    return devices.mirrored_cpus(2)
