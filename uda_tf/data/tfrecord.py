"""The slice record schema (docs/CONTRACTS.md), its parser, and an atomic sharded writer."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow as tf

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.string),
    "has_label": tf.io.FixedLenFeature([], tf.int64),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "channels": tf.io.FixedLenFeature([], tf.int64),
    "case_id": tf.io.FixedLenFeature([], tf.string),
    "domain": tf.io.FixedLenFeature([], tf.string),
    "slice_index": tf.io.FixedLenFeature([], tf.int64),
    "num_slices": tf.io.FixedLenFeature([], tf.int64),
    "spacing": tf.io.FixedLenFeature([3], tf.float32),
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def serialize_slice(
    image: np.ndarray,
    label: np.ndarray | None,
    case_id: str,
    domain: str,
    slice_index: int,
    num_slices: int,
    spacing,
) -> bytes:
    """One 2D slice as a serialized `tf.train.Example`.

    image: [H, W, C] (cast to float32), label: [H, W] integer values 0..255 or None.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    height, width, channels = image.shape
    if label is not None:
        label = np.asarray(label)
        if label.shape != (height, width):
            raise ValueError(f"label must be [H, W] = {(height, width)}, got {label.shape}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must lie in 0..255 (stored as uint8)")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (H, W, slice axis), got {spacing}")
    label_bytes = b"" if label is None else np.ascontiguousarray(label, dtype=np.uint8).tobytes()
    feature = {
        "image": _bytes(np.ascontiguousarray(image, dtype="<f4").tobytes()),
        "label": _bytes(label_bytes),
        "has_label": _int(label is not None),
        "height": _int(height),
        "width": _int(width),
        "channels": _int(channels),
        "case_id": _bytes(case_id.encode("utf-8")),
        "domain": _bytes(domain.encode("utf-8")),
        "slice_index": _int(slice_index),
        "num_slices": _int(num_slices),
        "spacing": tf.train.Feature(float_list=tf.train.FloatList(value=spacing)),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Deterministic map order, so the same data always gives the same shard bytes and hashes.
    return example.SerializeToString(deterministic=True)


def parse_slice(serialized, height: int, width: int, channels: int) -> dict:
    """Parses one serialized slice; works eagerly and inside `tf.data.Dataset.map`.

    Shapes are static ([H, W, C] image, [H, W] label) because they come from the arguments;
    a record whose stored H/W/C differ from them raises InvalidArgumentError.
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    checks = [
        tf.debugging.assert_equal(
            parsed[key], tf.constant(value, tf.int64),
            message=f"slice record {key} differs from the requested {key}={value}",
        )
        for key, value in (("height", height), ("width", width), ("channels", channels))
    ]
    with tf.control_dependencies(checks):
        image = tf.io.decode_raw(parsed["image"], tf.float32, little_endian=True)
        image = tf.reshape(image, [height, width, channels])
    label = tf.io.decode_raw(parsed["label"], tf.uint8)
    # An unlabelled record stores empty bytes; padding to H*W gives the documented zeros
    # without a tf.cond, and a label of any other size still fails in the reshape.
    label = tf.pad(label, [[0, height * width - tf.size(label)]])
    label = tf.reshape(label, [height, width])
    return {
        "image": image,
        "label": label,
        "has_label": parsed["has_label"],
        "case_id": parsed["case_id"],
        "domain": parsed["domain"],
        "slice_index": parsed["slice_index"],
        "num_slices": parsed["num_slices"],
        "spacing": parsed["spacing"],
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


class ShardWriter:
    """Writes records to `<directory>/<prefix>-<k:05d>.tfrecord`, `records_per_shard` each.

    Each shard is written under a temporary name and renamed into place once complete, so a
    reader never sees a half-written shard. `close()` returns [{file, records, sha256}] with
    `file` relative to `directory`. Used as a context manager, an exception removes the
    unfinished temporary file.
    """

    def __init__(self, directory: str, prefix: str, records_per_shard: int):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.directory = directory
        self.prefix = prefix
        self.records_per_shard = records_per_shard
        self.shards: list[dict] = []
        self._writer = None
        self._tmp_path = None
        self._count = 0
        os.makedirs(directory, exist_ok=True)

    def _final_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):05d}.tfrecord"

    def write(self, record: bytes) -> None:
        if self._writer is None:
            self._tmp_path = os.path.join(self.directory, f"{self._final_name()}.tmp-{os.getpid()}")
            self._writer = tf.io.TFRecordWriter(self._tmp_path)
            self._count = 0
        self._writer.write(record)
        self._count += 1
        if self._count == self.records_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._writer.close()
        name = self._final_name()
        sha = _sha256(self._tmp_path)
        os.replace(self._tmp_path, os.path.join(self.directory, name))
        self.shards.append({"file": name, "records": self._count, "sha256": sha})
        self._writer, self._tmp_path = None, None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish_shard()
        return list(self.shards)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if os.path.exists(self._tmp_path):
                os.remove(self._tmp_path)
            self._writer, self._tmp_path = None, None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(records, directory: str, prefix: str, records_per_shard: int) -> list[dict]:
    """Writes an iterable of serialized records; returns [{file, records, sha256}]."""
    with ShardWriter(directory, prefix, records_per_shard) as writer:
        for record in records:
            writer.write(record)
    return writer.shards
