"""The adversarial and entropy methods through the training command: the configs' data hints,
and flag combinations that must be refused with the flag named. (Its WGAN-GP critics with
MinEnt train on two in-process replicas in tests/methods/test_distributed.py.)"""
import pytest

from tests.cli.test_train_cli import _train_here


@pytest.mark.parametrize("args,expected", [
    (["--flagfile=configs/entropy_cc359.cfg", "--data_dir=/no/cc359"],
     "sites.google.com/view/calgary-campinas-dataset"),
    (["--flagfile=configs/adversarial_demo.cfg", "--data_dir=/no/demo"], "uda_tf.cli.phantom"),
    (["--method=source_only", "--minent_weight=0.1", "--data_dir=/no/x"], "--minent_weight"),
    (["--method=minent", "--data_dir=/no/x"], "--minent_weight > 0"),
])
def test_configs_and_bad_flag_combinations(args, expected):
    proc = _train_here(*args)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
