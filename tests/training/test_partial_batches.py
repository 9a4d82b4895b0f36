"""Validation on several replicas with a final batch smaller than the replica count (2 or 3
logical CPUs, 9 or 7 slices in batches of 8 or 4): no crash, and the Dice and loss are those
of exactly the real slices, as on one device. (A whole train.py run on 3 replicas with a
partial last validation batch: tests/cli/test_train_cli.py.)"""

import pytest
import tensorflow as tf

from tests.helpers import tiny_batch
from uda_tf.data import pipeline


def _evaluate(method, strategy, x, y, batch):
    from tests.methods.test_distributed import _build
    model = _build(method, strategy, "instance")  # same weights on every strategy
    padded = pipeline.padded_batch_size(batch, strategy.num_replicas_in_sync)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    ds = ds.map(lambda images, labels: pipeline.pad_batch(images, labels, padded))
    return model.evaluate(ds, steps=-(-len(x) // batch), verbose=0, return_dict=True)


@pytest.mark.parametrize("method,replicas,count,batch", [
    ("source_only", 2, 9, 8), ("source_only", 3, 7, 4), ("source_only", 3, 1, 4),
    # GRL tracks more metrics than validation returns: Keras then averaged each replica's
    # local Dice instead of reading the pooled one, even with no partial batch (10 on 2).
    ("grl", 3, 9, 8), ("grl", 2, 10, 10)])
def test_partial_validation_batches_on_replicas_match_one_device(method, replicas, count,
                                                                 batch, one_device,
                                                                 two_replicas,
                                                                 three_replicas):
    x, y, _ = tiny_batch(n=count, seed=count)
    strategy = {2: two_replicas, 3: three_replicas}[replicas]
    assert strategy.num_replicas_in_sync == replicas
    # one device, every slice in one batch: the plain mean and the pooled Dice
    expected = _evaluate(method, one_device, x, y, count)
    got = _evaluate(method, strategy, x, y, batch)
    assert 0 < expected["dice"] < 1
    for name in ("dice", "dice_a", "dice_b", "seg_loss"):
        assert got[name] == pytest.approx(expected[name], abs=1e-5), name


def test_pad_batch_weights_the_padding_zero():
    x = tf.reshape(tf.range(3 * 2, dtype=tf.float32), [3, 2])
    y = tf.constant([1, 2, 3])
    images, labels, weights = pipeline.pad_batch(x, y, 8)
    assert images.shape == (8, 2) and labels.numpy().tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert weights.numpy().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    full = pipeline.pad_batch(x, y, 3)
    assert full[2].numpy().tolist() == [1, 1, 1]
    assert [pipeline.padded_batch_size(b, r) for b, r in [(8, 3), (4, 3), (8, 2), (1, 3)]] \
        == [9, 6, 8, 3]


def test_training_batch_that_leaves_a_replica_empty_is_refused(tiny_prepared, tmp_path):
    """4 training samples on 3 replicas are cut 2, 2, 0: refused at start-up, naming it."""
    from absl import app
    from tests.cli.test_train_hardening import _cfg
    from uda_tf.cli import train
    data_dir, _ = tiny_prepared
    with pytest.raises(app.UsageError, match="--global_batch_size=4 on 3 replicas leaves a "
                                             "replica without samples .* multiple of 3"):
        train.train(_cfg(data_dir, tmp_path / "runs", num_cpu_devices=3, global_batch_size=4))
    assert not (tmp_path / "runs").exists()
