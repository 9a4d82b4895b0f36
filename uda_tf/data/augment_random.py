"""Domain-randomising intensity augmentations: new contrasts rather than perturbed ones.

Both ops take a batch [N, H, W, C] or [N, D, H, W, C] of images normalised roughly to [0, 1]
(the preprocessing's min-max or percentile normalisation) and work eagerly, inside tf.data and
under XLA (augment.py calls them one sample at a time in its compiled loop).

`label_intensity` follows SynthSeg (Billot et al., Medical Image Analysis 2023), which trains
on images synthesised from label maps with a random Gaussian intensity per label, so that a
network sees every contrast ordering between tissues. Here the image is real: each label region
keeps its own texture (its deviation from the region's mean), scaled by a random factor, and
moves to a random new mean; the background (label 0: air, skull, scalp in MR) too, so the
order of ALL region intensities is random (a T1-like image can come out T2-like).

`gin` follows GIN (global intensity non-linear augmentation; Ouyang et al., "Causality-inspired
single-source domain generalization for medical image segmentation", IEEE TMI 2022): the image
goes through a shallow convolutional network with freshly drawn random weights, which changes
intensities and local texture non-linearly while the shapes stay where they are, and the result
is blended with the original by a random weight.

`intensity_curve` maps each sample's intensities through a random smooth curve: a cubic
Bézier curve over the sample's normalised range whose four control values are drawn at random,
so it may rise, fall (inverting the contrast, as T1 -> T2 does) or bend in between. The
non-linear intensity transform of Models Genesis (Zhou et al., MICCAI 2019), which the
location-scale augmentation of SLAug (Su et al., AAAI 2023) uses for cross-modality
single-source generalisation; here with evenly spaced control abscissae, so the curve is an
explicit function of the intensity (no curve inversion or search, one fused elementwise op).
It needs no labels, so it also changes unlabelled images.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import tensorflow as tf

from uda_tf.data.augment_intensity import batch_size


def _offset(seed, i: int):
    """The op-level seed of an op's i-th random draw (ops sharing one seed draw alike)."""
    return None if seed is None else seed + i


def label_intensity(images, labels=None, *, label_intensity_mean=(0.0, 1.0),
                    label_intensity_texture=(0.5, 1.5), label_intensity_texture_flip=0.0,
                    label_intensity_classes=8, seed=None, active=None):
    """out = mu_k + s_k * (x - m_k) on the voxels of label k, per sample and channel: m_k the
    region's own mean, mu_k ~ U(label_intensity_mean), |s_k| ~ U(label_intensity_texture),
    s_k < 0 with probability label_intensity_texture_flip; clipped to label_intensity_mean's
    range. Without labels (an unlabelled batch) the images are returned unchanged; the labels
    are never changed.

    Why the flip: the texture kept inside a region belongs to the source contrast. Where two
    tissues meet, partial volume pulls each one's border voxels towards the other's intensity:
    on T1 the CSF voxels next to grey matter are brighter than the CSF mean, on T2 darker. A
    positive s_k keeps that cue (a segmentor can learn "CSF is the region that brightens
    towards GM"); a random sign takes it away while keeping the scan's noise and blur, close
    to SynthSeg (Billot et al. 2023), which draws every intensity from the labels alone.

    label_intensity_classes (K, static so that XLA sees fixed shapes): labels 0 .. K-1 each
    get their own draw; labels >= K share the draw of label K-1 (they are clipped to it).
    `active` [N]: samples where it is False are left as they are (mu_k = m_k, s_k = 1)."""
    if labels is None:
        return images
    k = int(label_intensity_classes)
    n, channels = batch_size(images), images.shape[-1]
    dtype = images.dtype
    # One segment per (sample, label): a segment sum for the region means and a gather of the
    # per-region (a_k, b_k) of x -> a_k x + b_k; under XLA ~5x faster than one-hot products.
    label = tf.clip_by_value(tf.cast(tf.reshape(labels, [n, -1]), tf.int32), 0, k - 1)
    segment = tf.reshape(label + k * tf.range(n)[:, None], [-1])  # [n * V]
    flat = tf.reshape(images, [-1, channels])  # [n * V, C]
    sums = tf.math.unsorted_segment_sum(flat, segment, n * k)
    count = tf.math.unsorted_segment_sum(tf.ones_like(flat[:, :1]), segment, n * k)
    region_mean = tf.reshape(sums / tf.maximum(count, 1.0), [n, k, channels])
    low, high = (float(v) for v in label_intensity_mean)
    mu = tf.random.uniform([n, k, channels], low, high, dtype=dtype, seed=seed)
    scale = tf.random.uniform([n, k, channels], *label_intensity_texture, dtype=dtype,
                              seed=_offset(seed, 1))
    if label_intensity_texture_flip:
        flip = tf.random.uniform([n, k, channels], dtype=dtype, seed=_offset(seed, 2))
        scale = tf.where(flip < label_intensity_texture_flip, -scale, scale)
    lower, upper = tf.fill([n, 1], tf.cast(low, dtype)), tf.fill([n, 1], tf.cast(high, dtype))
    if active is not None:  # identity: the region's own mean and texture, no clipping
        on = tf.reshape(active, [-1, 1, 1])
        mu, scale = tf.where(on, mu, region_mean), tf.where(on, scale, tf.ones_like(scale))
        lower = tf.where(on[:, 0], lower, tf.cast(-np.inf, dtype))
        upper = tf.where(on[:, 0], upper, tf.cast(np.inf, dtype))
    table = tf.reshape(tf.concat([scale, mu - scale * region_mean], -1), [n * k, 2 * channels])
    coefficients = tf.gather(table, segment)  # [n * V, 2C]
    out = flat * coefficients[:, :channels] + coefficients[:, channels:]
    out = tf.reshape(out, tf.shape(images))
    bounds = [-1] + [1] * (images.shape.rank - 1)
    out = tf.clip_by_value(out, tf.reshape(lower, bounds), tf.reshape(upper, bounds))
    out.set_shape(images.shape)
    return out


def _random_conv(h, fan_out: int, kernel: int, size, seed=None):
    """A 'valid' convolution of channels-first planes h [C_in, *(size + kernel - 1)] with
    weights and biases ~ N(0, 1): [fan_out, *size]. Written as a sum of shifted planes
    scaled by scalar weights: XLA fuses it into one loop per output channel; its convolution
    op on one small-channel sample was over 10x slower (a channels-last sum about 3x)."""
    rank = len(size)
    fan_in = h.shape[0]
    weights = tf.random.normal([kernel] * rank + [fan_in, fan_out], dtype=h.dtype, seed=seed)
    bias = tf.random.normal([fan_out], dtype=h.dtype, seed=_offset(seed, 1))
    outputs = []
    for o in range(fan_out):
        total = bias[o]
        for offset in itertools.product(range(kernel), repeat=rank):
            window = tuple(slice(a, a + int(s)) for a, s in zip(offset, size))
            for c in range(fan_in):
                total += weights[offset + (c, o)] * h[(c,) + window]
        outputs.append(total)
    return tf.stack(outputs)


def _gin_net(x, layers: int, width: int, kernel: int, seed=None):
    """One sample [1, *S, C] through a random conv net: `layers` convolutions (C -> width ->
    ... -> C), weights and biases ~ N(0, 1), each layer's kernel size drawn from {1, kernel}
    (the paper's pool of sizes; a conditional, so a size-1 layer costs what it needs),
    LeakyReLU(0.2) between layers, none after the last. The sample is padded once by
    mirroring (zeros if it is smaller than the margin; the paper pads every layer with zeros)
    and each layer uses up its share of the margin."""
    rank = x.shape.rank - 2
    channels = x.shape[-1]
    size = [int(s) for s in x.shape[1:-1]]
    r = kernel // 2
    margin = layers * r
    h = tf.transpose(x[0], [rank] + list(range(rank)))  # channels first: [C, *S]
    mode = "SYMMETRIC" if margin <= min(size) else "CONSTANT"
    h = tf.pad(h, [[0, 0]] + [[margin, margin]] * rank, mode=mode)
    for layer in range(layers):
        fan_out = channels if layer == layers - 1 else width
        out_size = [s + 2 * (margin - (layer + 1) * r) for s in size]
        layer_seed = _offset(seed, 3 * layer)
        full = functools.partial(_random_conv, h, fan_out, kernel, out_size, layer_seed)
        inner = tuple([slice(None)] + [slice(r, h.shape[a + 1] - r) for a in range(rank)])
        point = functools.partial(_random_conv, h[inner], fan_out, 1, out_size, layer_seed)
        size_one = tf.random.uniform([], seed=_offset(layer_seed, 2)) < 0.5
        h = full() if r == 0 else tf.cond(size_one, point, full)
        if layer < layers - 1:
            h = tf.nn.leaky_relu(h, 0.2)
    return tf.transpose(h, list(range(1, rank + 1)) + [0])[None]


def _match_moments(x, reference):
    """x shifted and scaled to `reference`'s per-channel mean and std (one sample)."""
    axes = list(range(x.shape.rank - 1))
    mean, var = tf.nn.moments(x, axes, keepdims=True)
    ref_mean, ref_var = tf.nn.moments(reference, axes, keepdims=True)
    return (x - mean) * tf.sqrt(ref_var / tf.maximum(var, 1e-12)) + ref_mean


def _gin_one(x, layers, width, kernel, seed=None):
    """GIN of one sample [1, *S, C]: random net, output moved to the input's per-channel mean
    and std, blended alpha * x + (1 - alpha) * net(x) with alpha ~ U(0, 1), and the blend moved
    to the input's mean and std again (a blend of two images has a smaller spread)."""
    net = _match_moments(_gin_net(x, layers, width, kernel, seed), x)
    alpha = tf.random.uniform([], dtype=x.dtype, seed=_offset(seed, 3 * layers))
    return _match_moments(alpha * x + (1.0 - alpha) * net, x)


def gin(images, *, gin_layers=4, gin_channels=2, gin_kernel=3, seed=None, active=None):
    """GIN (module docstring) with a separate random network per sample; per-sample mean and
    std per channel are kept. The paper rescales to the input's Frobenius norm instead; mean
    and std keep the preprocessing's intensity range (a norm match lets the mean drift or
    flip sign). When every layer draws kernel size 1 (probability 2^-gin_layers) the net is
    a random curve of each voxel's intensity, no texture change; where that curve is close
    to an increasing line over the sample's range, the moment match gives back (nearly) the
    input. A batch of one (what augment.py's XLA loop passes) is one network; a larger batch
    (the jit=False path) loops over its samples with tf.map_fn, one network each.
    `active` [N]: samples where it is False are returned unchanged."""
    args = (int(gin_layers), int(gin_channels), int(gin_kernel), seed)
    if None in images.shape[1:]:
        raise ValueError(f"gin needs static sample dims, got {images.shape}")
    if images.shape[0] == 1:
        out = _gin_one(images, *args)
    else:
        out = tf.map_fn(lambda x: _gin_one(x[None], *args)[0], images)
    if active is not None:
        out = tf.where(tf.reshape(active, [-1] + [1] * (images.shape.rank - 1)), out, images)
    return out


def intensity_curve(images, *, curve_values=(0.0, 1.0), seed=None, active=None):
    """x -> B(u) * span + low per sample and channel, u = (x - low) / span in [0, 1] (low and
    span the sample's own minimum and range, kept): B(u) = (1-u)^3 y0 + 3(1-u)^2 u y1 +
    3(1-u) u^2 y2 + u^3 y3 with y0..y3 ~ U(curve_values), so B stays inside that range. y0 > y3
    inverts the contrast. `active` [N]: samples where it is False get y = (0, 1/3, 2/3, 1),
    the identity."""
    n, channels = batch_size(images), images.shape[-1]
    rank = images.shape.rank
    axes = list(range(1, rank - 1))
    low = tf.reduce_min(images, axes, keepdims=True)
    span = tf.maximum(tf.reduce_max(images, axes, keepdims=True) - low, 1e-6)
    y = tf.random.uniform([n, 4, channels], *curve_values, dtype=images.dtype, seed=seed)
    if active is not None:
        identity = tf.reshape(tf.constant([0.0, 1 / 3, 2 / 3, 1.0], images.dtype), [1, 4, 1])
        y = tf.where(tf.reshape(active, [-1, 1, 1]), y, identity)
    y = tf.reshape(y, [-1, 4] + [1] * (rank - 2) + [channels])
    u = tf.clip_by_value((images - low) / span, 0.0, 1.0)
    v = 1.0 - u
    curve = (v * v * v * y[:, 0] + 3.0 * v * v * u * y[:, 1] + 3.0 * v * u * u * y[:, 2]
             + u * u * u * y[:, 3])
    return curve * span + low


def check_intensity_curve(params: dict) -> None:
    """ValueError naming the parameter when intensity_curve's parameters are unusable."""
    low, high = params["curve_values"]
    _require(0 <= low < high <= 1, f"curve_values must be low:high with 0 <= low < high <= 1, "
             f"got {low}:{high}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value, lower: int) -> bool:
    return float(value) == int(value) and int(value) >= lower


def check_label_intensity(params: dict) -> None:
    """ValueError naming the parameter when label_intensity's parameters are unusable."""
    low, high = params["label_intensity_mean"]
    _require(low < high, f"label_intensity_mean must be low:high with low < high, "
             f"got {low}:{high}")
    low, high = params["label_intensity_texture"]
    _require(0 <= low <= high, f"label_intensity_texture must be low:high with "
             f"0 <= low <= high, got {low}:{high}")
    flip = params["label_intensity_texture_flip"]
    _require(0 <= flip <= 1, f"label_intensity_texture_flip must be a probability in 0..1, "
             f"got {flip}")
    classes = params["label_intensity_classes"]
    _require(_is_int(classes, 1) and int(classes) <= 256,
             f"label_intensity_classes must be an integer in 1..256, got {classes}")


def check_gin(params: dict) -> None:
    """ValueError naming the parameter when gin's parameters are unusable."""
    for key in ("gin_layers", "gin_channels"):
        _require(_is_int(params[key], 1), f"{key} must be an integer >= 1, got {params[key]}")
    kernel = params["gin_kernel"]
    _require(_is_int(kernel, 1) and int(kernel) % 2 == 1,
             f"gin_kernel must be an odd integer >= 1, got {kernel}")
