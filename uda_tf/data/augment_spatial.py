"""Spatial augmentations as TF ops on batches: images [N, H, W, C] or [N, D, H, W, C] with labels
[N, H, W] or [N, D, H, W] kept aligned (images interpolated linearly, labels by nearest
neighbour, so no new label values appear).

Rotation, scaling and elastic deformation share one resampling pass (`spatial_transform`): a
per-sample coordinate map built from the affine part and a smooth displacement field, then one
gather-based (bi/tri)linear lookup. Three ops in one pass cost about as much as one. The elastic
field is coarse Gaussian noise upsampled smoothly, in the spirit of Simard et al. (2003).
"""
from __future__ import annotations

import math

import tensorflow as tf

from uda_tf.data.augment_intensity import batch_size, smooth_field


def reverse(x, axis: int):
    """tf.reverse(x, [axis]) through a 2D/3D view: TF's reverse kernel is ~10x slower on a
    4D tensor with a trailing size-1 axis than on the same data viewed as [before, n(, after)]."""
    shape = tf.shape(x)
    before = tf.reduce_prod(shape[:axis])
    after = tf.reduce_prod(shape[axis + 1:])
    if x.shape[axis + 1:].num_elements() == 1:
        view = tf.reverse(tf.reshape(x, [before, shape[axis]]), [1])
    else:
        view = tf.reverse(tf.reshape(x, [before, shape[axis], after]), [1])
    out = tf.reshape(view, shape)
    out.set_shape(x.shape)
    return out


def flip(images, labels=None, *, axis: int, active=None):
    """Reverse spatial `axis` (1 = first spatial axis) of the samples where `active` [n] is
    True (all if None); labels follow."""
    flipped = reverse(images, axis)
    flipped_labels = None if labels is None else reverse(labels, axis)
    if active is None:
        return flipped, flipped_labels
    # A select, not the cheaper-looking x + m (r - x): that rounds, and a flip must be exact.
    images = tf.where(tf.reshape(active, [-1] + [1] * (images.shape.rank - 1)), flipped, images)
    if labels is not None:
        mask = tf.reshape(active, [-1] + [1] * (labels.shape.rank - 1))
        labels = tf.where(mask, flipped_labels, labels)
    return images, labels


def _rotation_2d(angle):
    c, s = tf.cos(angle), tf.sin(angle)
    return tf.stack([tf.stack([c, -s], -1), tf.stack([s, c], -1)], -2)  # [n, 2, 2]


def _rotation_3d(angles):
    """R = Rz @ Ry @ Rx (rotations about the three axes of the volume), angles [n, 3]."""
    zeros, ones = tf.zeros_like(angles[:, 0]), tf.ones_like(angles[:, 0])

    def about(axis, a):
        c, s = tf.cos(a), tf.sin(a)
        rows = {0: [[ones, zeros, zeros], [zeros, c, -s], [zeros, s, c]],
                1: [[c, zeros, s], [zeros, ones, zeros], [-s, zeros, c]],
                2: [[c, -s, zeros], [s, c, zeros], [zeros, zeros, ones]]}[axis]
        return tf.stack([tf.stack(r, -1) for r in rows], -2)

    return about(2, angles[:, 2]) @ about(1, angles[:, 1]) @ about(0, angles[:, 0])


def sample(images, coords, *, order: int, fill, labels=None, label_fill=0):
    """Resamples each sample of `images` [n, *S, C] at `coords`: one tensor [n, *S_out] per
    spatial axis, in voxel index units; order 1 = (bi/tri)linear, 0 = nearest. Points outside
    the volume get `fill` ([n] or a scalar).

    With `labels` [n, *S] it returns (images, labels): the labels by nearest neighbour at the
    same points (so no new label values appear), outside points `label_fill`. The nearest
    voxel is a corner of the linear cell, so both share one coordinate computation.

    Written for TF's CPU kernels and XLA: one gather per corner from a flat view, corner
    indices as offsets of the lower corner, and nested lerps, so a 2D bilinear lookup is ~20
    elementwise passes plus 4 gathers (5 with labels)."""
    rank = images.shape.rank - 2
    channels = images.shape[-1]
    # One channel: gather from a 1D view (half the cost of gathering rows of [M, 1]).
    flat = tf.reshape(images, [-1] if channels == 1 else [-1, channels])
    index, frac, step, inside = _lower_corners(coords, tf.shape(images)[:-1], rank)
    nearest = index
    for i in range(rank):
        nearest += tf.where(frac[i] >= 0.5, step[i], 0)
    if order == 0:
        out = tf.gather(flat, nearest)
    else:
        out = _interpolate(flat, index, frac, step, channels)
    if channels == 1:
        out = out[..., None]
    fill = tf.cast(tf.reshape(fill, [-1] + [1] * coords[0].shape.rank), images.dtype)
    out = tf.where(inside[..., None], out, fill)
    if labels is None:
        return out
    picked = tf.gather(tf.reshape(labels, [-1]), nearest)
    return out, tf.where(inside, picked, tf.cast(label_fill, labels.dtype))


def _lower_corners(coords, shape, rank: int):
    """For `sample`: the flat index of each point's lower cell corner, its fractional offsets
    per axis, the index step to the upper corner per axis, and which points lie inside the
    volume; `shape` = [n, *S]."""
    n, spatial = shape[0], shape[1:]
    strides = [tf.reduce_prod(spatial[i + 1:]) for i in range(rank)]
    out_rank = coords[0].shape.rank
    base = tf.reshape(tf.range(n) * tf.reduce_prod(spatial), [-1] + [1] * (out_rank - 1))
    limits = [tf.cast(spatial[i] - 1, tf.float32) for i in range(rank)]
    inside = None
    for c, limit in zip(coords, limits):
        ok = (c >= -0.5) & (c <= limit + 0.5)
        inside = ok if inside is None else inside & ok
    # Along an axis of size 1 the "upper" corner is the lower one.
    step = [tf.where(spatial[i] > 1, strides[i], 0) for i in range(rank)]
    index, frac = base, []
    for c, limit, stride in zip(coords, limits, strides):
        c = tf.clip_by_value(c, 0.0, limit)
        # The lower corner stays below the last voxel, so lower + 1 is always inside.
        f = tf.minimum(tf.floor(c), tf.maximum(limit - 1.0, 0.0))
        index += tf.cast(f, tf.int32) * stride
        frac.append(c - f)
    return index, frac, step, inside


def _interpolate(flat, index, frac, step, channels):
    """For `sample`: the (bi/tri)linear value at each point from the corners of its cell."""
    rank = len(frac)
    weights = [f if channels == 1 else f[..., None] for f in frac]

    def corner_value(axis, offset):
        # Interpolates along axes >= axis, the lower corner shifted by `offset`.
        if axis == rank:
            return tf.gather(flat, offset)
        low = corner_value(axis + 1, offset)
        high = corner_value(axis + 1, offset + step[axis])
        # (1 - w) low + w high, not low + w (high - low): exact at w = 0 and w = 1, so
        # mirrored samples (whole-voxel coordinates) keep their values bit for bit.
        return (1.0 - weights[axis]) * low + weights[axis] * high

    return corner_value(0, index)


def spatial_transform(images, labels=None, *, angles=None, scales=None, displacement=None,
                      flips=None):
    """One resampling of every sample by rotation `angles` ([n] in 2D, [n, 3] in 3D, radians),
    isotropic zoom `scales` [n] (>1 enlarges), mirroring `flips` (one boolean [n] per spatial
    axis, or None for an axis left alone) and `displacement` (voxels: a list of d tensors
    [n, *S], one per axis, or one [n, *S, d] tensor), about the centre. Images outside the
    field of view are filled with the sample's minimum, labels with 0. A sample with only
    flips maps voxel centres onto voxel centres, so it comes out exactly mirrored."""
    rank = images.shape.rank - 2
    spatial_static = images.shape[1:-1]
    if None in spatial_static:
        raise ValueError(f"spatial_transform needs static spatial dims, got {images.shape}")
    n = batch_size(images)
    if displacement is not None and not isinstance(displacement, (list, tuple)):
        displacement = tf.unstack(displacement, axis=-1)
    matrix = tf.eye(rank, batch_shape=[n])
    if angles is not None:
        matrix = _rotation_2d(angles) if rank == 2 else _rotation_3d(angles)
    if scales is not None:
        matrix = matrix / scales[:, None, None]
    if flips is not None:
        # M F with F = diag(+-1): the output is mirrored first, then rotated and zoomed.
        signs = [tf.ones([n]) if f is None else tf.where(f, -1.0, 1.0) for f in flips]
        matrix = matrix * tf.stack(signs, axis=1)[:, None, :]
    # source_i = sum_j M_ij (p_j - c_j) + c_i (+ displacement_i): the output voxel p looks up
    # the input there. Built from broadcast [n, 1.., S_j, ..1] terms, not a dense einsum.
    centred = []
    for j, size in enumerate(spatial_static):
        shape = [1] * (rank + 1)
        shape[j + 1] = size
        centred.append(tf.reshape(tf.range(size, dtype=tf.float32) - (size - 1) / 2.0, shape))
    coords = []
    for i, size in enumerate(spatial_static):
        c = (size - 1) / 2.0
        for j in range(rank):
            c = c + tf.reshape(matrix[:, i, j], [-1] + [1] * rank) * centred[j]
        if displacement is not None:
            c = c + displacement[i]
        coords.append(tf.broadcast_to(c, tf.concat([[n], spatial_static], 0)))
    low = tf.reduce_min(images, axis=list(range(1, rank + 2)))
    if labels is None:
        out = sample(images, coords, order=1, fill=low)
        out.set_shape(images.shape)
        return out, None
    out, warped = sample(images, coords, order=1, fill=low, labels=labels)
    out.set_shape(images.shape)
    warped.set_shape(labels.shape)
    return out, warped


def random_spatial(images, labels=None, *, rotation_degrees=None, scale_range=None,
                   elastic_alpha=None, elastic_grid: int = 5, active=None, flips=None,
                   seed=None):
    """Draws rotation (U(-deg, deg), per axis in 3D), zoom (U(scale_range)) and elastic
    displacement (std `elastic_alpha` voxels on an `elastic_grid`^d lattice) for every sample
    given, each only if its parameter is set, and applies them in one pass. `active` maps
    "rotation"/"scaling"/"elastic" to per-sample booleans [n]: where False, that component is
    the identity for that sample (each component has its own probability in `augment.build`).
    `flips` (see spatial_transform) mirrors in the same pass; `active` may carry them too, as
    "flip1", "flip2"(, "flip3"): booleans [n] for spatial axis 1, 2(, 3)."""
    rank = images.shape.rank - 2
    n = batch_size(images)
    active = active or {}
    flip_keys = [f"flip{axis}" for axis in range(1, rank + 1)]
    if flips is None and any(k in active for k in flip_keys):
        flips = [active.get(k) for k in flip_keys]

    def on(name, value, identity):
        return value if name not in active else tf.where(
            tf.reshape(active[name], [-1] + [1] * (value.shape.rank - 1)), value, identity)

    angles = scales = displacement = None
    if rotation_degrees:
        limit = math.radians(float(rotation_degrees))
        angles = tf.random.uniform([n] if rank == 2 else [n, 3], -limit, limit, seed=seed)
        angles = on("rotation", angles, tf.zeros_like(angles))
    if scale_range:
        scales = tf.random.uniform([n], *scale_range, seed=seed)
        scales = on("scaling", scales, tf.ones_like(scales))
    if elastic_alpha:
        # One field per axis: XLA reads separate tensors far faster than strided slices
        # [..., i] of a stacked [n, *S, d] field (5x in the resampling step).
        displacement = []
        for _ in range(rank):
            field = float(elastic_alpha) * smooth_field(
                n, list(images.shape[1:-1]), elastic_grid, 1, seed=seed)[..., 0]
            displacement.append(on("elastic", field, tf.zeros_like(field)))
    return spatial_transform(images, labels, angles=angles, scales=scales,
                             displacement=displacement, flips=flips)
