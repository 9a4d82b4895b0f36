"""Record schemas (docs/CONTRACTS.md): 2D slices and 3D volumes, their parsers (one record,
or a batch at once for the training pipeline), and an atomic sharded writer."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow as tf

from uda_tf.files import partial_path

# Images are stored as raw little-endian floats of this type; parsers return float32.
IMAGE_DTYPES = {"float32": ("<f4", tf.float32), "float16": ("<f2", tf.float16)}
COMPRESSIONS = ("", "GZIP")

# Features every record has; slices and volumes add their own (docs/CONTRACTS.md).
_COMMON_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.string),
    # Region of interest (e.g. DRIVE's field of view), uint8; absent in older records.
    "roi": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "has_label": tf.io.FixedLenFeature([], tf.int64),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "channels": tf.io.FixedLenFeature([], tf.int64),
    "case_id": tf.io.FixedLenFeature([], tf.string),
    "domain": tf.io.FixedLenFeature([], tf.string),
    "spacing": tf.io.FixedLenFeature([3], tf.float32),
}
_FEATURES = {
    **_COMMON_FEATURES,
    "slice_index": tf.io.FixedLenFeature([], tf.int64),
    "num_slices": tf.io.FixedLenFeature([], tf.int64),
}
_VOLUME_FEATURES = {
    **_COMMON_FEATURES,
    "depth": tf.io.FixedLenFeature([], tf.int64),
    "pad_value": tf.io.FixedLenFeature([], tf.float32),
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _np_dtype(image_dtype: str) -> str:
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {', '.join(IMAGE_DTYPES)}, "
                         f"got {image_dtype!r}")
    return IMAGE_DTYPES[image_dtype][0]


def tfrecord_options(compression: str | None) -> tf.io.TFRecordOptions | None:
    compression = compression or ""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be none or GZIP, got {compression!r}")
    return tf.io.TFRecordOptions(compression_type=compression) if compression else None


def _mask_bytes(mask, shape, what: str) -> bytes:
    if mask is None:
        return b""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{what} must be {list(shape)}, got {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{what} values must lie in 0..255 (stored as uint8)")
    return np.ascontiguousarray(mask, dtype=np.uint8).tobytes()


def serialize_slice(
    image: np.ndarray,
    label: np.ndarray | None,
    case_id: str,
    domain: str,
    slice_index: int,
    num_slices: int,
    spacing,
    *,
    image_dtype: str = "float32",
    roi: np.ndarray | None = None,
) -> bytes:
    """One 2D slice as a serialized `tf.train.Example`.

    image: [H, W, C] (stored as `image_dtype`), label and roi: [H, W] integer values 0..255 or
    None.
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
        "image": _bytes(np.ascontiguousarray(image, dtype=_np_dtype(image_dtype)).tobytes()),
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
    if roi is not None:  # absent rather than empty: older readers and records stay identical
        feature["roi"] = _bytes(_mask_bytes(roi, (height, width), "roi"))
    return _example_bytes(feature)


def _example_bytes(feature: dict) -> bytes:
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Deterministic map order, so the same data always gives the same shard bytes and hashes.
    return example.SerializeToString(deterministic=True)


def _decode_image(raw, count: int, image_dtype: str | None):
    """float32 values of raw image bytes; with `image_dtype` None the stored type is told
    from the byte count (2 or 4 bytes per value), so old callers read float16 shards too."""
    if image_dtype is not None:
        tf_dtype = IMAGE_DTYPES[image_dtype][1]
        return tf.cast(tf.io.decode_raw(raw, tf_dtype, little_endian=True), tf.float32)
    return tf.cond(
        tf.equal(tf.strings.length(raw), 2 * count),
        lambda: tf.cast(tf.io.decode_raw(raw, tf.float16, little_endian=True), tf.float32),
        lambda: tf.io.decode_raw(raw, tf.float32, little_endian=True),
    )


def _zeros_if_empty(raw, count: int):
    # An absent label/roi is empty bytes; padding to `count` gives the documented zeros
    # without a tf.cond, and bytes of any other size still fail in the reshape.
    values = tf.io.decode_raw(raw, tf.uint8)
    return tf.pad(values, [[0, count - tf.size(values)]])


def parse_slice(serialized, height: int, width: int, channels: int, *,
                image_dtype: str | None = None) -> dict:
    """Parses one serialized slice; works eagerly and inside `tf.data.Dataset.map`.

    Shapes are static ([H, W, C] image, [H, W] label) because they come from the arguments;
    a record whose stored H/W/C differ from them raises InvalidArgumentError. The image comes
    back as float32 whether stored as float32 or float16 (pass the manifest's `image_dtype` to
    skip telling them apart). `roi` is zeros when the record has none.
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
        image = _decode_image(parsed["image"], height * width * channels, image_dtype)
        image = tf.reshape(image, [height, width, channels])
    label = tf.reshape(_zeros_if_empty(parsed["label"], height * width), [height, width])
    roi = tf.reshape(_zeros_if_empty(parsed["roi"], height * width), [height, width])
    return {
        "image": image,
        "label": label,
        "roi": roi,
        "has_label": parsed["has_label"],
        "case_id": parsed["case_id"],
        "domain": parsed["domain"],
        "slice_index": parsed["slice_index"],
        "num_slices": parsed["num_slices"],
        "spacing": parsed["spacing"],
    }


_METADATA = ("has_label", "case_id", "domain", "slice_index", "num_slices", "spacing")


def parse_slices(serialized, height: int, width: int, channels: int, *,
                 image_dtype: str = "float32", label: bool = True, roi: bool = False,
                 metadata: bool = False) -> dict:
    """Parses a batch [N] of serialized slices at once (one `parse_example` and one
    `decode_raw` per feature instead of N of each: the fast path of the training pipeline).

    Returns `image` [N, H, W, C] float32, and `label`/`roi` [N, H, W] uint8 (zeros where a
    record has none) and the metadata of `parse_slice` when asked for.
    """
    keys = ["image", "height", "width", "channels"]
    keys += ["label"] * label + ["roi"] * roi + list(_METADATA) * metadata
    parsed = tf.io.parse_example(serialized, {k: _FEATURES[k] for k in keys})
    checks = [
        tf.debugging.assert_equal(
            parsed[key], tf.constant(value, tf.int64),
            message=f"slice record {key} differs from the requested {key}={value}",
        )
        for key, value in (("height", height), ("width", width), ("channels", channels))
    ]
    with tf.control_dependencies(checks):  # every image has the same byte count once checked
        image = tf.io.decode_raw(parsed["image"], IMAGE_DTYPES[image_dtype][1],
                                 little_endian=True)
    out = {"image": tf.reshape(tf.cast(image, tf.float32), [-1, height, width, channels])}
    for key in [k for k, wanted in (("label", label), ("roi", roi)) if wanted]:
        # fixed_length zero-pads the empty bytes of a record without one.
        values = tf.io.decode_raw(parsed[key], tf.uint8, fixed_length=height * width)
        out[key] = tf.reshape(values, [-1, height, width])
    if metadata:
        out.update({k: parsed[k] for k in _METADATA})
    return out


def serialize_volume(image: np.ndarray, label: np.ndarray | None, case_id: str, domain: str,
                     spacing, *, pad_value: float = 0.0, image_dtype: str = "float32",
                     roi: np.ndarray | None = None) -> bytes:
    """One whole prepared volume as a serialized `tf.train.Example` (3D models crop patches
    from it inside tf.data). image: [H, W, D, C]; label, roi: [H, W, D] or None."""
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"image must be [H, W, D, C], got shape {image.shape}")
    height, width, depth, channels = image.shape
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (H, W, D axes), got {spacing}")
    feature = {
        "image": _bytes(np.ascontiguousarray(image, dtype=_np_dtype(image_dtype)).tobytes()),
        "label": _bytes(_mask_bytes(label, (height, width, depth), "label")),
        "roi": _bytes(_mask_bytes(roi, (height, width, depth), "roi")),
        "has_label": _int(label is not None),
        "height": _int(height),
        "width": _int(width),
        "depth": _int(depth),
        "channels": _int(channels),
        "case_id": _bytes(case_id.encode("utf-8")),
        "domain": _bytes(domain.encode("utf-8")),
        "spacing": tf.train.Feature(float_list=tf.train.FloatList(value=spacing)),
        "pad_value": tf.train.Feature(float_list=tf.train.FloatList(value=[float(pad_value)])),
    }
    return _example_bytes(feature)


def parse_volume(serialized, channels: int, *, image_dtype: str = "float32") -> dict:
    """Parses one volume record: `image` [H, W, D, C] float32 (H, W, D from the record, so
    they are dynamic), `label`/`roi` [H, W, D] uint8 (zeros when absent), `has_label`,
    `case_id`, `domain`, `spacing` [3], `pad_value` (the value that means background)."""
    parsed = tf.io.parse_single_example(serialized, _VOLUME_FEATURES)
    tf.debugging.assert_equal(parsed["channels"], tf.constant(channels, tf.int64),
                              message=f"volume record channels differ from {channels}")
    shape = tf.stack([parsed["height"], parsed["width"], parsed["depth"]])
    image = tf.cast(tf.io.decode_raw(parsed["image"], IMAGE_DTYPES[image_dtype][1],
                                     little_endian=True), tf.float32)
    count = tf.cast(tf.reduce_prod(shape), tf.int32)
    image = tf.reshape(image, tf.concat([shape, [channels]], 0))
    image.set_shape([None, None, None, channels])
    masks = {k: tf.reshape(_zeros_if_empty(parsed[k], count), shape) for k in ("label", "roi")}
    for mask in masks.values():
        mask.set_shape([None, None, None])
    return {
        "image": image,
        **masks,
        **{k: parsed[k] for k in ("has_label", "case_id", "domain", "spacing", "pad_value")},
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

    def __init__(self, directory: str, prefix: str, records_per_shard: int, *,
                 compression: str | None = None):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.options = tfrecord_options(compression)
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
            self._tmp_path = partial_path(os.path.join(self.directory, self._final_name()))
            self._writer = tf.io.TFRecordWriter(self._tmp_path, self.options)
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
