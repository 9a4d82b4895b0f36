"""Streaming tf.data input pipelines over the prepared TFRecord shards.

Training, per domain: the domain's shard files (one list per domain and split) are shuffled
and interleaved, records are shuffled (serialized bytes, so the buffer's memory does not depend
on the dataset size), repeated, batched by the *global* batch size (Keras splits it over
replicas), parsed a batch at a time (one vectorised `parse_example`), augmented with batch-level
TF ops, and source (image, label) batches are zipped with target image batches of the same size.
Target labels are never parsed: they cannot reach a training update.

The training datasets carry `AutoShardPolicy.FILE`: under a multi-worker strategy each worker
reads its own subset of every domain's shard files, so a domain needs at least as many shards
per split as there are workers (see --records_per_shard of prepare).

3D data (`output: volumes` in the manifest): each record is a whole prepared volume; patches
are cropped inside tf.data (nnU-Net-style foreground oversampling: a share of patches centred on
a voxel of a randomly chosen foreground class, Isensee et al. 2021), so patch size and sampling
can change without preparing the data again (docs/CONTRACTS.md).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from uda_tf.data import augment
from uda_tf.data.augment_intensity import fda
from uda_tf.data.tfrecord import parse_slices, parse_volume

AUTOTUNE = tf.data.AUTOTUNE


def _records(files, *, shuffle_files: bool, seed, compression="", cycle_length=4):
    """Training reads shards in a shuffled order, several at once; evaluation reads them one
    after another so records come in their stored order."""
    if not shuffle_files:
        return tf.data.TFRecordDataset(files, compression_type=compression)
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return files_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
        cycle_length=min(cycle_length, len(files)), num_parallel_calls=AUTOTUNE,
        deterministic=False)


def _file_sharded(ds):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    return ds.with_options(options)


def sample_patch(image, label, patch_size, *, foreground_fraction=0.0, pad_value=0.0):
    """A random patch [*patch_size, C] of a volume [H, W, D, C] (label [H, W, D]), padded to at
    least the patch size first. With probability `foreground_fraction` (and where the label has
    foreground) the patch is centred on a random voxel of a randomly chosen foreground class."""
    channels = image.shape[-1]  # static; lost by the padding below
    patch = tf.constant(patch_size, tf.int32)
    shape = tf.shape(label)
    pad = tf.maximum(patch - shape, 0)
    widths = tf.stack([pad // 2, pad - pad // 2], axis=1)
    image = tf.pad(image, tf.concat([widths, [[0, 0]]], 0), constant_values=pad_value)
    label = tf.pad(label, widths)
    max_start = tf.shape(label) - patch
    start = tf.cast(tf.random.uniform([3]) * tf.cast(max_start + 1, tf.float32), tf.int32)
    if foreground_fraction > 0:
        classes, _ = tf.unique(tf.boolean_mask(label, label > 0))
        has_foreground = tf.size(classes) > 0

        def centred_on_class():
            pick = tf.random.uniform([], 0, tf.maximum(tf.size(classes), 1), tf.int32)
            voxels = tf.where(tf.equal(label, tf.gather(classes, pick)))
            centre = tf.cast(voxels[tf.random.uniform([], 0, tf.shape(voxels)[0], tf.int32)],
                             tf.int32)
            return tf.clip_by_value(centre - patch // 2, 0, max_start)

        use = has_foreground & (tf.random.uniform([]) < foreground_fraction)
        start = tf.cond(use, centred_on_class, lambda: start)
    start = tf.minimum(start, max_start)
    image = tf.slice(image, tf.concat([start, [0]], 0), tf.concat([patch, [-1]], 0))
    label = tf.slice(label, start, patch)
    image.set_shape([*patch_size, channels])
    label.set_shape(patch_size)
    return image, label


def _volume_patches(manifest, *, labelled, patch_size, foreground_fraction, patches_per_volume):
    channels = manifest.image_shape[-1]
    dtype = manifest.image_dtype

    def fn(record):
        volume = parse_volume(record, channels, image_dtype=dtype)
        pairs = [sample_patch(volume["image"], volume["label"], patch_size,
                              foreground_fraction=foreground_fraction if labelled else 0.0,
                              pad_value=volume["pad_value"])
                 for _ in range(patches_per_volume)]
        images = tf.stack([p[0] for p in pairs])
        if labelled:
            return images, tf.stack([p[1] for p in pairs])
        return images

    return fn


def _patch_size(manifest, patch_size):
    if patch_size is not None:
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive integers, got {patch_size}")
        return patch_size
    fixed = manifest.image_shape[:3]
    if None in fixed:
        raise ValueError("this 3D dataset has volumes of different depths: pass patch_size "
                         "(e.g. (96, 96, 64)) to crop patches")
    return tuple(fixed)


def only_cases(ds, cases):
    """Keep the serialized records whose case_id is one of `cases` (slices or volumes)."""
    wanted = tf.constant(sorted(cases))
    spec = {"case_id": tf.io.FixedLenFeature([], tf.string)}

    def keep(record):
        case = tf.io.parse_single_example(record, spec)["case_id"]
        return tf.reduce_any(tf.equal(case, wanted))
    return ds.filter(keep)


def domain_stream(data_dir, manifest, domain, split, *, batch_size, labelled, shuffle_buffer,
                  seed, augment_data, augmentations=None, augment_params=None, patch_size=None,
                  foreground_fraction=1 / 3, patches_per_volume=1, cycle_length=4, cases=None):
    """Endless shuffled batches of one domain: (images, labels) if `labelled`, else images.

    `augmentations` (a preset or op names, see uda_tf.data.augment) applies when
    `augment_data`; None means the "default" preset (flips and intensity jitter). `cases`
    restricts the stream to those case ids."""
    files = manifest.shard_files(data_dir, domain, split)
    ds = _records(files, shuffle_files=True, seed=seed, compression=manifest.compression,
                  cycle_length=cycle_length)
    if cases is not None:
        ds = only_cases(ds, cases)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    if manifest.record_kind == "volumes":
        fn = _volume_patches(manifest, labelled=labelled,
                             patch_size=_patch_size(manifest, patch_size),
                             foreground_fraction=foreground_fraction,
                             patches_per_volume=int(patches_per_volume))
        ds = ds.map(fn, num_parallel_calls=AUTOTUNE).unbatch()
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        height, width, channels = manifest.image_shape
        dtype = manifest.image_dtype

        def parse(records):
            parsed = parse_slices(records, height, width, channels, image_dtype=dtype,
                                  label=labelled)
            return (parsed["image"], parsed["label"]) if labelled else parsed["image"]

        # Batch, then parse: one parse_example per batch instead of one per slice.
        # deterministic=False: a batch that is slow to augment does not hold back the next
        # (shuffling already made the order random; the seed still fixes the shuffle).
        ds = ds.batch(batch_size, drop_remainder=True).map(
            parse, num_parallel_calls=AUTOTUNE, deterministic=False)
    if augment_data:
        augmenter = augment.build(augmentations or "default", **(augment_params or {}))
        ds = ds.map(augmenter, num_parallel_calls=AUTOTUNE, deterministic=False)
    return ds


def train_dataset(data_dir, manifest, *, source, target=None, global_batch_size,
                  shuffle_buffer=2048, seed=0, augment_data=True, augmentations=None,
                  augment_params=None, patch_size=None, foreground_fraction=1 / 3,
                  patches_per_volume=1, fda_beta=0.0, cycle_length=4,
                  target_augmentations=None, num_workers=1, labelled_target=None):
    """((x_s, y_s), x_t) batches when `target` is given, else (x_s, y_s).

    `labelled_target` = (domain, case ids, k): semi-supervised; the last k samples of every
    labelled batch come from those target cases (read with their labels, augmented as the
    source) and the first global_batch_size - k from the source, so the batch size and the
    replica split stay as they are. Only the named cases' records are parsed.

    Both streams have `global_batch_size` samples per batch. 3D datasets give patches of
    `patch_size`. `augmentations` (a preset or op names) applies to the source stream and,
    unless `target_augmentations` is given, to the target stream too. `fda_beta` > 0 applies
    Fourier domain adaptation to the source images (low-frequency amplitudes from the paired
    target batch; Yang & Soatto 2020).

    Under a multi-worker strategy (`num_workers` > 1) each worker reads a disjoint subset of
    every domain's shard files (AutoShardPolicy.FILE), and tf.distribute rebatches: each
    global batch a worker reads is spread over `num_workers` steps, so every step consumes
    `global_batch_size` samples over all workers, `global_batch_size / num_workers` from each.
    """
    _check_shards_per_worker(data_dir, manifest, (source, target), num_workers)
    common = dict(batch_size=global_batch_size, shuffle_buffer=shuffle_buffer,
                  augment_data=augment_data, augmentations=augmentations,
                  augment_params=augment_params, patch_size=patch_size,
                  foreground_fraction=foreground_fraction,
                  patches_per_volume=patches_per_volume, cycle_length=cycle_length)
    src = _source_stream(data_dir, manifest, source, labelled_target, seed, common)
    if target is None:
        if fda_beta:
            raise ValueError("fda_beta needs a target domain")
        return _file_sharded(src.prefetch(AUTOTUNE))
    if target_augmentations is not None:
        common["augmentations"] = target_augmentations
    tgt = domain_stream(data_dir, manifest, target, "train", labelled=False, seed=seed + 1,
                        **common)
    ds = tf.data.Dataset.zip((src, tgt))
    if fda_beta:
        beta = float(fda_beta)
        ds = ds.map(lambda s, t: ((fda(s[0], t, beta=beta), s[1]), t),
                    num_parallel_calls=AUTOTUNE)
    return _file_sharded(ds.prefetch(AUTOTUNE))


def _check_shards_per_worker(data_dir, manifest, domains, num_workers: int) -> None:
    for domain in domains:
        shards = len(manifest.shard_files(data_dir, domain, "train")) if domain else num_workers
        if shards < num_workers:
            raise ValueError(
                f"domain {domain!r} has {shards} training shard file(s) for {num_workers} "
                "workers; file-level sharding needs at least one per worker: prepare the data "
                "again with a smaller --records_per_shard")


def _source_stream(data_dir, manifest, source, labelled_target, seed, common):
    """The labelled stream of `train_dataset`: source batches, their last k samples from the
    `labelled_target` cases when given (common["batch_size"] samples in all)."""
    if not labelled_target:
        return domain_stream(data_dir, manifest, source, "train", labelled=True, seed=seed,
                             **common)
    global_batch_size = common["batch_size"]
    domain, cases, k = labelled_target
    if not 0 < k < global_batch_size:
        raise ValueError(f"labelled target samples per batch must be in 1..."
                         f"{global_batch_size - 1}, got {k}")
    few = domain_stream(data_dir, manifest, domain, "train", labelled=True, seed=seed + 2,
                        cases=cases, **{**common, "batch_size": k})
    src = domain_stream(data_dir, manifest, source, "train", labelled=True, seed=seed,
                        **{**common, "batch_size": global_batch_size - k})
    return tf.data.Dataset.zip((src, few)).map(
        lambda s, t: (tf.concat([s[0], t[0]], 0), tf.concat([s[1], t[1]], 0)),
        num_parallel_calls=AUTOTUNE)


def padded_batch_size(batch_size: int, replicas: int) -> int:
    """The smallest multiple of `replicas` that holds `batch_size` samples."""
    return -(-int(batch_size) // int(replicas)) * int(replicas)


def pad_batch(images, labels, batch_size):
    """(images, labels, weights) of exactly `batch_size` samples: a batch with fewer (the
    last of a split, or every one when `batch_size` is `padded_batch_size`) is filled up with
    copies of its own samples, weighted 0 (the real ones 1).

    Under a tf.distribute strategy each batch is split over the replicas in pieces of
    ceil(batch / replicas): a final batch of 1 on 2 replicas, or any batch of 4 on 3, leaves a
    replica without a sample, which the models cannot run on (an empty batch fails in the
    residual blocks), and uneven pieces would weigh the replicas' means unequally. Batches of
    a multiple of the replica count give every replica the same share; the weights keep the
    padding out of the loss and the Dice (SegmentationMethod.test_step), so the metrics are
    those of exactly the real samples. Copies rather than zeros: real images, so nothing
    non-finite can appear."""
    n = tf.shape(images)[0]
    index = tf.concat([tf.range(n), tf.range(batch_size - n) % tf.maximum(n, 1)], 0)
    weights = tf.concat([tf.ones([n]), tf.zeros([batch_size - n])], 0)
    images, labels = tf.gather(images, index), tf.gather(labels, index)
    images.set_shape([batch_size, *images.shape[1:]])
    labels.set_shape([batch_size, *labels.shape[1:]])
    weights.set_shape([batch_size])
    return images, labels, weights


def _padded(ds, batch_size):
    """`pad_batch` on every (images, labels) batch; read by data rather than by file under a
    multi-worker strategy, so that every worker sees its share of every batch."""
    ds = ds.map(lambda images, labels: pad_batch(images, labels, batch_size))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def eval_dataset(data_dir, manifest, domain, split, *, batch_size, with_metadata=False,
                 pad_to_batch=False):
    """One ordered pass over a split: (images, labels), or the parsed dicts when
    `with_metadata` (case_id and slice_index are needed to reassemble volumes).
    `pad_to_batch` (a size >= `batch_size`, e.g. `padded_batch_size`): (images, labels,
    weights) batches of that size, each holding up to `batch_size` real slices
    (`pad_batch`): validation under a distribution strategy.

    For 3D datasets each element is one whole volume (a batch of 1: image [1, H, W, D, C])."""
    if pad_to_batch and (with_metadata or manifest.record_kind == "volumes"):
        raise ValueError("pad_to_batch is for 2D (images, labels) batches; 3D validation "
                         "pads patches (eval_patches)")
    files = manifest.shard_files(data_dir, domain, split)
    ds = _records(files, shuffle_files=False, seed=None, compression=manifest.compression)
    if manifest.record_kind == "volumes":
        channels = manifest.image_shape[-1]
        dtype = manifest.image_dtype
        ds = ds.map(lambda r: parse_volume(r, channels, image_dtype=dtype)).batch(1)
    else:
        height, width, channels = manifest.image_shape
        dtype = manifest.image_dtype
        ds = ds.batch(batch_size).map(
            lambda r: parse_slices(r, height, width, channels, image_dtype=dtype,
                                   roi=with_metadata, metadata=with_metadata),
            num_parallel_calls=AUTOTUNE)
    if not with_metadata:
        ds = ds.map(lambda e: (e["image"], e["label"]))
    if pad_to_batch:
        ds = _padded(ds, max(int(pad_to_batch), batch_size))
    return ds.prefetch(AUTOTUNE)


def tile_volume(image, label, patch_size, pad_value=0.0):
    """Non-overlapping patches covering a volume [H, W, D, C] (label [H, W, D]): padded at the
    far end of each axis to a multiple of the patch (image with `pad_value`, label with
    background), then cut into [n, *patch_size, C] and [n, *patch_size], in C order."""
    channels = image.shape[-1]
    patch = tf.constant(patch_size, tf.int32)
    shape = tf.shape(label)
    counts = (shape + patch - 1) // patch
    widths = tf.stack([tf.zeros([3], tf.int32), counts * patch - shape], axis=1)
    image = tf.pad(image, tf.concat([widths, [[0, 0]]], 0), constant_values=pad_value)
    label = tf.pad(label, widths)

    def tiles(x, extra):
        # [n0 p0, n1 p1, n2 p2, ...] -> [n0, n1, n2, p0, p1, p2, ...] -> [n, p0, p1, p2, ...]
        split = tf.stack([counts[0], patch[0], counts[1], patch[1], counts[2], patch[2]])
        x = tf.reshape(x, tf.concat([split, extra], 0))
        x = tf.transpose(x, [0, 2, 4, 1, 3, 5] + ([6] if extra.shape[0] else []))
        return tf.reshape(x, tf.concat([[-1], patch, extra], 0))

    image = tiles(image, tf.constant([channels], tf.int32))
    label = tiles(label, tf.zeros([0], tf.int32))
    image.set_shape([None, *patch_size, channels])
    label.set_shape([None, *patch_size])
    return image, label


def eval_patches(data_dir, manifest, domain, split, patch_size, *, batch_size,
                 with_metadata=False, pad_to_batch=False):
    """One ordered pass over a 3D split as (patches, labels) batches: every volume cut into
    non-overlapping patches of the model's input size (`tile_volume`). Validation of a 3D
    model during training uses these: fixed shapes, so they distribute over replicas and need
    no retracing; Dice pooled over the tiles is the Dice of the whole volumes (the padding is
    background). Whole-volume evaluation uses `uda_tf.evaluation.inference.sliding_window`.
    `with_metadata`: dicts with `image`, `label` and each patch's `has_label` (the label-free
    target criteria read them; a case stored without a label gives zero labels).
    `pad_to_batch`: (patches, labels, weights) batches of that size (see eval_dataset)."""
    if pad_to_batch and with_metadata:
        raise ValueError("pad_to_batch gives (patches, labels, weights), not metadata dicts")
    if manifest.record_kind != "volumes":
        raise ValueError("eval_patches needs a 3D dataset (prepared with --output=volumes)")
    patch_size = tuple(int(p) for p in patch_size)
    ds = eval_dataset(data_dir, manifest, domain, split, batch_size=1, with_metadata=True)
    def tiles(v):
        images, labels = tile_volume(v["image"][0], v["label"][0], patch_size, v["pad_value"][0])
        if not with_metadata:
            return images, labels
        return {"image": images, "label": labels,
                "has_label": tf.fill(tf.shape(images)[:1], v["has_label"][0])}
    ds = ds.map(tiles).unbatch().batch(batch_size)
    if pad_to_batch:
        ds = _padded(ds, max(int(pad_to_batch), batch_size))
    return ds.prefetch(AUTOTUNE)


def num_eval_patches(manifest, domain, split, patch_size) -> int:
    """How many patches `eval_patches` yields, from the prepared shapes in the manifest."""
    total = 0
    for case in manifest.cases(domain, split):
        shape = manifest.case(case)["prepared_shape"][:3]
        total += int(np.prod([-(-int(n) // int(p)) for n, p in zip(shape, patch_size)]))
    return total
