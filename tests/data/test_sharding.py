"""Multi-worker input: with the rewrite tf.distribute applies for AutoShardPolicy.FILE, two
workers read disjoint shard files of each domain that together cover the domain, and a
dataset with fewer shard files than workers is refused with a message naming the fix."""
import hashlib

import numpy as np
import pytest
from tensorflow.python.distribute import input_ops  # what experimental_distribute_dataset uses

from uda_tf.data import pipeline


def _seen(ds, batches):
    src, tgt = set(), set()
    for (x_s, _), x_t in ds.take(batches):
        src |= {hashlib.sha1(np.asarray(x).tobytes()).hexdigest() for x in x_s}
        tgt |= {hashlib.sha1(np.asarray(x).tobytes()).hexdigest() for x in x_t}
    return src, tgt


def test_two_workers_read_disjoint_files_covering_each_domain(tiny_prepared):
    data_dir, manifest = tiny_prepared
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", target="dom_b",
                                global_batch_size=4, shuffle_buffer=4, augment_data=False,
                                num_workers=2)
    every = _seen(ds, 12)
    assert [len(s) for s in every] == [manifest.num_records(d, "train")
                                       for d in ("dom_a", "dom_b")]
    workers = [_seen(input_ops.auto_shard_dataset(ds, 2, i, 2), 12) for i in range(2)]
    for domain in range(2):
        a, b = workers[0][domain], workers[1][domain]
        assert a and b and not a & b
        assert a | b == every[domain]


def test_fewer_shards_than_workers_is_refused(tiny_prepared):
    data_dir, manifest = tiny_prepared
    with pytest.raises(ValueError, match="'dom_a' has 2 training shard.*3 workers.*"
                                         "--records_per_shard"):
        pipeline.train_dataset(data_dir, manifest, source="dom_a", target="dom_b",
                               global_batch_size=4, num_workers=3)
