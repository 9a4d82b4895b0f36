"""A few labelled target cases: only the named cases' labels are read, each batch carries the
asked number of them in place of source samples, and bad requests name the flag."""
import numpy as np
import pytest
import tensorflow as tf

from uda_tf.data import pipeline, semi_supervised


def test_resolve_cases(tiny_prepared):
    _, manifest = tiny_prepared
    train = sorted(manifest["domains"]["dom_b"]["cases"]["train"])
    assert semi_supervised.resolve_cases(manifest, "dom_b", "1") == train[:1]
    assert semi_supervised.resolve_cases(manifest, "dom_b", f" {train[0]} ") == [train[0]]
    with pytest.raises(ValueError, match="--target_labelled_cases=9: .* ask for 1 to"):
        semi_supervised.resolve_cases(manifest, "dom_b", "9")
    val = manifest["domains"]["dom_b"]["cases"]["val"][0]
    with pytest.raises(ValueError, match="not labelled training cases of target domain"):
        semi_supervised.resolve_cases(manifest, "dom_b", val)  # a val case is never training


def test_only_named_cases_are_read(tiny_prepared):
    data_dir, manifest = tiny_prepared
    case = manifest["domains"]["dom_b"]["cases"]["train"][0]
    files = pipeline.shard_files(manifest, data_dir, "dom_b", "train")
    ds = pipeline.only_cases(tf.data.TFRecordDataset(files), [case])
    spec = {"case_id": tf.io.FixedLenFeature([], tf.string)}
    seen = {tf.io.parse_single_example(r, spec)["case_id"].numpy().decode() for r in ds}
    assert seen == {case}
    # and a case of another split is filtered out entirely
    assert not list(pipeline.only_cases(tf.data.TFRecordDataset(files), ["no_such_case"]))


def test_mixed_batches_keep_their_size_and_carry_the_target_samples():
    x_s = np.zeros((6, 4, 4, 1), np.float32)
    y_s = np.zeros((6, 4, 4), np.uint8)
    x_t = np.full((6, 4, 4, 1), 5.0, np.float32)
    x_l = np.ones((2, 4, 4, 1), np.float32)
    y_l = np.full((2, 4, 4), 2, np.uint8)
    train = tf.data.Dataset.from_tensors(((x_s, y_s), x_t)).repeat(2)
    extra = tf.data.Dataset.from_tensors((x_l, y_l)).repeat()
    for (x, y), t in semi_supervised.mix_labelled(train, extra, 2):
        assert x.shape == (6, 4, 4, 1) and y.shape == (6, 4, 4)
        np.testing.assert_array_equal(x[:4], 0)
        np.testing.assert_array_equal(x[4:], 1)
        np.testing.assert_array_equal(y[4:], 2)
        np.testing.assert_array_equal(t, 5)  # unlabelled target batch untouched
    source_only = tf.data.Dataset.from_tensors((x_s, y_s))
    (x, y), = list(semi_supervised.mix_labelled(source_only, extra, 2))
    np.testing.assert_array_equal(y[4:], 2)
