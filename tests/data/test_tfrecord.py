"""Slice records: what is written is what is read, eagerly and inside tf.data."""
import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from uda_tf.data import tfrecord

H, W, C = 6, 5, 2


def _slice(seed, labelled=True):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(H, W, C)).astype(np.float32)
    label = rng.integers(0, 4, size=(H, W)).astype(np.uint8) if labelled else None
    return image, label


def _record(seed, labelled=True, case_id="case_é01", k=3):
    image, label = _slice(seed, labelled)
    data = tfrecord.serialize_slice(image, label, case_id, "scanner_a", k, 7, (1.5, 2.0, 3.25))
    return data, image, label


def _check(parsed, image, label, case_id="case_é01", k=3):
    np.testing.assert_array_equal(np.asarray(parsed["image"]), image)
    expected_label = np.zeros((H, W), np.uint8) if label is None else label
    np.testing.assert_array_equal(np.asarray(parsed["label"]), expected_label)
    assert parsed["label"].dtype == tf.uint8 and parsed["image"].dtype == tf.float32
    assert int(parsed["has_label"]) == (label is not None)
    assert parsed["case_id"].numpy().decode("utf-8") == case_id
    assert parsed["domain"].numpy() == b"scanner_a"
    assert int(parsed["slice_index"]) == k and int(parsed["num_slices"]) == 7
    np.testing.assert_allclose(parsed["spacing"].numpy(), [1.5, 2.0, 3.25])
    assert parsed["spacing"].dtype == tf.float32


@pytest.mark.parametrize("labelled", [True, False])
def test_roundtrip_eager(labelled):
    data, image, label = _record(0, labelled)
    _check(tfrecord.parse_slice(data, H, W, C), image, label)


@pytest.mark.parametrize("labelled", [True, False])
def test_roundtrip_in_tf_data_has_static_shapes(labelled):
    items = [_record(seed, labelled, k=seed) for seed in range(3)]
    ds = tf.data.Dataset.from_tensor_slices([d for d, _, _ in items])
    ds = ds.map(lambda r: tfrecord.parse_slice(r, H, W, C))
    assert ds.element_spec["image"].shape == (H, W, C)
    assert ds.element_spec["label"].shape == (H, W)
    assert ds.element_spec["spacing"].shape == (3,)
    for seed, parsed in enumerate(ds):
        _, image, label = items[seed]
        _check(parsed, image, label, k=seed)


def test_wrong_requested_shape_is_an_error():
    data, _, _ = _record(0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="height"):
        tfrecord.parse_slice(data, W, H, C)  # same element count, swapped axes
    ds = tf.data.Dataset.from_tensors(data).map(lambda r: tfrecord.parse_slice(r, W, H, C))
    with pytest.raises(tf.errors.InvalidArgumentError):
        next(iter(ds))


def test_serialize_rejects_bad_shapes():
    image, label = _slice(0)
    with pytest.raises(ValueError, match="label"):
        tfrecord.serialize_slice(image, label.T, "c", "d", 0, 1, (1, 1, 1))
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        tfrecord.serialize_slice(image[..., 0], label, "c", "d", 0, 1, (1, 1, 1))


def test_sharded_writer_is_atomic_ordered_and_hashed(tmp_path):
    records = [_record(seed, k=seed)[0] for seed in range(10)]
    shards = tfrecord.write_shards(records, str(tmp_path), "scanner_a-train", 4)
    assert [s["file"] for s in shards] == [
        f"scanner_a-train-{k:05d}.tfrecord" for k in range(3)
    ]
    assert [s["records"] for s in shards] == [4, 4, 2]
    assert sorted(os.listdir(tmp_path)) == [s["file"] for s in shards]  # no .tmp left
    for s in shards:
        with open(tmp_path / s["file"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == s["sha256"]
    files = [str(tmp_path / s["file"]) for s in shards]
    read_back = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    assert read_back == records


def test_failed_write_leaves_no_temporary_file(tmp_path):
    def records():
        yield _record(0)[0]
        yield _record(1)[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tfrecord.write_shards(records(), str(tmp_path), "d-train", 5)
    assert os.listdir(tmp_path) == []
