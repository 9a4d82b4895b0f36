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
    files = manifest.shard_files(data_dir, "dom_b", "train")
    ds = pipeline.only_cases(tf.data.TFRecordDataset(files), [case])
    spec = {"case_id": tf.io.FixedLenFeature([], tf.string)}
    seen = {tf.io.parse_single_example(r, spec)["case_id"].numpy().decode() for r in ds}
    assert seen == {case}
    # and a case of another split is filtered out entirely
    assert not list(pipeline.only_cases(tf.data.TFRecordDataset(files), ["no_such_case"]))


def test_batches_keep_their_size_and_carry_the_named_target_case(tiny_prepared):
    data_dir, manifest = tiny_prepared
    case = manifest["domains"]["dom_b"]["cases"]["train"][0]
    common = dict(source="dom_a", target="dom_b", global_batch_size=6, shuffle_buffer=8,
                  seed=0, augment_data=False)
    plain = pipeline.train_dataset(data_dir, manifest, **common)
    mixed = pipeline.train_dataset(data_dir, manifest, labelled_target=("dom_b", [case], 2),
                                   **common)
    ((x_p, y_p), t_p), ((x_m, y_m), t_m) = next(iter(plain)), next(iter(mixed))
    assert x_m.shape == x_p.shape and y_m.shape == y_p.shape and t_m.shape == t_p.shape
    # the last 2 samples are the named case's slices: same image and label as read directly
    only = pipeline.domain_stream(data_dir, manifest, "dom_b", "train", batch_size=64,
                                  labelled=True, shuffle_buffer=1, seed=0, augment_data=False,
                                  cases=[case])
    images, labels = next(iter(only))
    for i in (4, 5):
        match = np.flatnonzero([np.array_equal(x_m[i], im) for im in images.numpy()])
        assert match.size, f"sample {i} is not a slice of {case}"
        np.testing.assert_array_equal(y_m[i], labels.numpy()[match[0]])
    with pytest.raises(ValueError, match="labelled target samples per batch"):
        pipeline.train_dataset(data_dir, manifest, labelled_target=("dom_b", [case], 6),
                               **common)
