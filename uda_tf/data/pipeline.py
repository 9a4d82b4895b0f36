"""Streaming tf.data input pipelines over the prepared TFRecord shards.

Training: per domain, shuffle the shard files, interleave them, parse in parallel, shuffle,
repeat, batch by the *global* batch size (Keras splits it over replicas), augment, and zip
source (image, label) with target (image) batches of the same size. Target labels are dropped
at parse time: they never reach a training update.
"""
from __future__ import annotations

import tensorflow as tf

from uda_tf.data import augment
from uda_tf.data.manifest import shard_files
from uda_tf.data.tfrecord import parse_slice

AUTOTUNE = tf.data.AUTOTUNE


def _records(files, *, shuffle_files: bool, seed):
    """Training reads shards in a shuffled order, several at once; evaluation reads them one
    after another so slices come in their stored order."""
    if not shuffle_files:
        return tf.data.TFRecordDataset(files)
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return files_ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                               num_parallel_calls=AUTOTUNE, deterministic=False)


def _parser(manifest):
    height, width, channels = manifest["image_shape"]
    return lambda record: parse_slice(record, height, width, channels)


def domain_stream(data_dir, manifest, domain, split, *, batch_size, labelled, shuffle_buffer,
                  seed, augment_data):
    """Endless shuffled batches of one domain: (images, labels) if `labelled`, else images."""
    files = shard_files(manifest, data_dir, domain, split)
    ds = _records(files, shuffle_files=True, seed=seed)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    parse = _parser(manifest)
    if labelled:
        ds = ds.map(lambda r: (lambda e: (e["image"], e["label"]))(parse(r)),
                    num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda r: parse(r)["image"], num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    if augment_data:
        fn = augment.augment_labelled if labelled else augment.augment_unlabelled
        ds = ds.map(fn, num_parallel_calls=AUTOTUNE)
    return ds


def train_dataset(data_dir, manifest, *, source, target=None, global_batch_size,
                  shuffle_buffer=2048, seed=0, augment_data=True):
    """((x_s, y_s), x_t) batches when `target` is given, else (x_s, y_s)."""
    src = domain_stream(data_dir, manifest, source, "train", batch_size=global_batch_size,
                        labelled=True, shuffle_buffer=shuffle_buffer, seed=seed,
                        augment_data=augment_data)
    if target is None:
        return src.prefetch(AUTOTUNE)
    tgt = domain_stream(data_dir, manifest, target, "train", batch_size=global_batch_size,
                        labelled=False, shuffle_buffer=shuffle_buffer, seed=seed + 1,
                        augment_data=augment_data)
    return tf.data.Dataset.zip((src, tgt)).prefetch(AUTOTUNE)


def num_records(manifest, domain, split) -> int:
    """Slices of one domain/split, from the manifest's shard list."""
    return sum(s["records"] for s in manifest["shards"]
               if s["domain"] == domain and s["split"] == split)


def eval_dataset(data_dir, manifest, domain, split, *, batch_size, with_metadata=False):
    """One ordered pass over a split: (images, labels), or the parsed dicts when
    `with_metadata` (case_id and slice_index are needed to reassemble volumes)."""
    files = shard_files(manifest, data_dir, domain, split)
    ds = _records(files, shuffle_files=False, seed=None).map(_parser(manifest),
                                                              num_parallel_calls=AUTOTUNE)
    if not with_metadata:
        ds = ds.map(lambda e: (e["image"], e["label"]))
    return ds.batch(batch_size).prefetch(AUTOTUNE)
