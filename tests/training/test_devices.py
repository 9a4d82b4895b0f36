"""Which cluster a process joins (TF_CONFIG, Slurm, none), and the mixed-precision policy.
Resolvers only: no strategy is created, so nothing here starts a server."""
import json

import pytest
import tensorflow as tf

from uda_tf.training import devices

SLURM_ENV = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ["TF_CONFIG", "SLURM_PROCID", "SLURM_NTASKS", *SLURM_ENV]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _tf_config(env, n=2, index=1):
    workers = [f"127.0.0.1:{2000 + i}" for i in range(n)]
    env.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers},
                                        "task": {"type": "worker", "index": index}}))


def test_auto_takes_tf_config_with_several_tasks(clean_env):
    _tf_config(clean_env)
    resolver = devices.cluster_resolver("auto")
    assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
    assert resolver.cluster_spec().as_dict()["worker"] == ["127.0.0.1:2000", "127.0.0.1:2001"]
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert devices.cluster_resolver("none") is None


def test_auto_stays_on_one_machine_without_a_cluster(clean_env):
    assert devices.cluster_resolver("auto") is None
    _tf_config(clean_env, n=1, index=0)  # a one-task TF_CONFIG is one machine
    assert devices.cluster_resolver("auto") is None


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="the resolver would set CUDA_VISIBLE_DEVICES for this process")
def test_slurm_step_on_cpu_nodes(clean_env):
    for name, value in SLURM_ENV.items():
        clean_env.setenv(name, value)
    clean_env.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # as on a CPU node
    resolver = devices.cluster_resolver("auto", slurm_port_base=9000)
    assert isinstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
    # Every task is a worker, rank -> task id; CPU nodes get a cluster all the same.
    assert resolver.cluster_spec().as_dict() == {"worker": ["node01:9000", "node02:9000"]}
    assert resolver.get_task_info() == ("worker", 1)


@pytest.mark.parametrize("cluster,expected", [("tf_config", "--cluster=tf_config"),
                                              ("slurm", "--cluster=slurm"),
                                              ("mpi", "--cluster='mpi'")])
def test_explicit_cluster_that_is_not_there_names_the_flag(clean_env, cluster, expected):
    with pytest.raises(ValueError, match=expected):
        devices.cluster_resolver(cluster)


def test_bad_tf_config_is_named(clean_env):
    clean_env.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        devices.cluster_resolver("auto")


def test_mixed_precision_policy_on_cpu():
    # The tests run without a GPU: bfloat16 (fast oneDNN kernels, no loss scaling needed).
    assert devices.mixed_precision_policy() == "mixed_bfloat16"
