"""Intensity augmentations as TF ops on batches: [N, H, W, C] or [N, D, H, W, C].

Each op draws one random value (or field) per sample and works eagerly and inside tf.data. The
ranges follow nnU-Net's defaults (Isensee et al. 2021, batchgenerators). `active` [N] (bool)
selects the samples an op changes: the others get the op's identity parameter (gain 1, sigma 0,
...) in the same vectorised pass. On a CPU that is cheaper than gathering the chosen samples and
scattering them back, which copies the whole batch (measured in benchmarks/data_pipeline.py).
Fourier domain adaptation (FDA, Yang & Soatto 2020) swaps low-frequency amplitudes between a
source and a target batch.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf


def batch_size(x):
    """The static batch size where known, else the dynamic one. Inside XLA loops over single
    samples a dynamic size turns into a bounded shape that broadcasts then reject."""
    return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def _per_sample(x, low, high, seed=None, active=None, identity=None):
    """One U(low, high) value per sample, shaped to broadcast against x; `identity` where
    `active` is False."""
    n = batch_size(x)
    value = tf.random.uniform([n], low, high, seed=seed)
    if active is not None:
        value = tf.where(active, value, tf.cast(identity, value.dtype))
    return tf.reshape(value, [-1] + [1] * (x.shape.rank - 1))


def _axes(x):
    return tf.range(1, tf.rank(x))


def gamma(images, *, gamma_range=(0.7, 1.5), seed=None, active=None):
    """x -> ((x - min) / range) ** g * range + min per sample (range kept), g ~ U(range)."""
    low = tf.reduce_min(images, _axes(images), keepdims=True)
    span = tf.reduce_max(images, _axes(images), keepdims=True) - low
    span = tf.maximum(span, 1e-6)
    g = _per_sample(images, *gamma_range, seed=seed, active=active, identity=1.0)
    unit = tf.clip_by_value((images - low) / span, 1e-7, 1.0)
    # exp(g log u) rather than pow: TF's CPU pow kernel is ~5x slower.
    return tf.exp(g * tf.math.log(unit)) * span + low


def contrast(images, *, contrast_range=(0.75, 1.25), seed=None, active=None):
    """(x - mean) * c + mean, clipped to the sample's original range (nnU-Net)."""
    axes = _axes(images)
    mean = tf.reduce_mean(images, axes, keepdims=True)
    c = _per_sample(images, *contrast_range, seed=seed, active=active, identity=1.0)
    out = (images - mean) * c + mean
    return tf.clip_by_value(out, tf.reduce_min(images, axes, keepdims=True),
                            tf.reduce_max(images, axes, keepdims=True))


def brightness(images, *, brightness_range=(0.75, 1.25), seed=None, active=None):
    """Multiplicative brightness x * b (nnU-Net's BrightnessMultiplicativeTransform)."""
    return images * _per_sample(images, *brightness_range, seed=seed, active=active,
                                identity=1.0)


def jitter(images, *, jitter_scale=0.1, jitter_shift=0.1, seed=None, active=None):
    """x * (1 + a) + b, a ~ U(-scale, scale), b ~ U(-shift, shift): scanner gain and offset."""
    a = _per_sample(images, -jitter_scale, jitter_scale, seed=seed, active=active, identity=0.0)
    b = _per_sample(images, -jitter_shift, jitter_shift,
                    seed=None if seed is None else seed + 1, active=active, identity=0.0)
    return images * (1.0 + a) + b


_BANK_VALUES = 1 << 22  # at most ~16 MB of float32 noise per sample shape


@functools.lru_cache(maxsize=8)
def noise_bank(shape: tuple) -> np.ndarray:
    """[K * 2 * S0, *shape[1:]] independent N(0, 1) values (fixed seed): K fields of twice the
    sample's first axis, K = 8 or fewer for large samples."""
    fields = int(max(1, min(8, _BANK_VALUES // (2 * int(np.prod(shape))))))
    rng = np.random.default_rng(2021)
    return rng.standard_normal((fields * 2 * shape[0],) + tuple(shape[1:])).astype(np.float32)


def noise(images, *, noise_std=(0.0, 0.1), seed=None, active=None):
    """Additive Gaussian noise with a per-sample std ~ U(noise_std) (normalised units).

    Every sample reads a window of a fixed bank of independent N(0, 1) values (noise_bank) at a
    random field, offset along the first spatial axis and sign: its noise is independent
    Gaussian noise voxel to voxel, as with fresh draws, while the batch costs one row copy
    instead of ~15 ns of Box-Muller per voxel (TF's CPU random_normal; XLA's is slower still).
    Two samples may share a shifted window, which an augmentation does not need to avoid."""
    sigma = _per_sample(images, *noise_std, seed=seed, active=active, identity=0.0)
    shape = images.shape[1:]
    if None in shape:  # no bank without a static sample shape: draw fresh numbers
        return images + tf.random.normal(tf.shape(images), seed=seed) * sigma
    bank = noise_bank(tuple(int(d) for d in shape))
    n, size = batch_size(images), int(shape[0])
    windows = bank.shape[0] // size - 1  # start rows 0 .. (2K - 1) * size
    start = tf.random.uniform([n], 0, windows * size, tf.int32, seed=seed)
    rows = start[:, None] + tf.range(size)[None, :]
    field = tf.gather(tf.constant(bank), rows)  # [n, *shape]: contiguous row copies
    sign = _per_sample(images, 0.0, 1.0, seed=seed) < 0.5
    return images + field * tf.where(sign, -sigma, sigma)


def _bspline_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of a uniform cubic B-spline with `n_in` control values spread
    over `n_out` samples (ends clamped): a C2-smooth upsampling that is one matrix product,
    so it also compiles with XLA (tf.image.resize's bicubic kernel does not)."""
    t = np.linspace(0.0, n_in - 1.0, n_out)
    i = np.floor(t).astype(int)
    u = t - i
    weights = np.stack([(1 - u) ** 3, 3 * u**3 - 6 * u**2 + 4, -3 * u**3 + 3 * u**2 + 3 * u + 1,
                        u**3], axis=1) / 6.0
    matrix = np.zeros((n_out, n_in))
    for k in range(4):
        np.add.at(matrix, (np.arange(n_out), np.clip(i + k - 1, 0, n_in - 1)), weights[:, k])
    return matrix.astype(np.float32)


def upsample_field(coarse, spatial_shape):
    """[n, g, .., g, C] control values -> [n, *spatial_shape, C] by separable cubic B-splines.

    Each axis is a sum of g broadcast products (g is small), which XLA fuses into one loop;
    as a dense contraction it was 2.5x slower."""
    out = coarse
    rank = len(spatial_shape)
    for axis, size in enumerate(spatial_shape):
        grid = int(coarse.shape[axis + 1])
        matrix = _bspline_matrix(int(size), grid)
        shape = [1] * (rank + 2)
        shape[axis + 1] = int(size)
        total = 0.0
        for g in range(grid):
            plane = tf.expand_dims(tf.gather(out, g, axis=axis + 1), axis + 1)
            total += tf.constant(matrix[:, g].reshape(shape)) * plane
        out = total
    return out


def smooth_field(n, spatial_shape, grid: int, channels: int = 1, seed=None):
    """[n, *spatial_shape, channels] smooth random field: N(0, 1) values on a coarse `grid`^d
    lattice, upsampled with cubic B-splines."""
    coarse = tf.random.normal([n] + [grid] * len(spatial_shape) + [channels], seed=seed)
    return upsample_field(coarse, spatial_shape)


def bias_field(images, *, bias_strength=0.3, bias_grid=4, seed=None, active=None):
    """Multiplies by exp(smooth field * strength): a slowly varying MR coil sensitivity
    (the multiplicative bias-field model of N4, Tustison et al. 2010)."""
    spatial = images.shape[1:-1]
    if None in spatial:
        raise ValueError(f"bias_field needs static spatial dims, got {images.shape}")
    strength = _per_sample(images, bias_strength, bias_strength, active=active, identity=0.0)
    field = smooth_field(batch_size(images), list(spatial), bias_grid, 1, seed=seed)
    return images * tf.exp(strength * field)


def _gaussian_kernels(sigma, radius: int):
    """[n, 2r+1] normalised Gaussian kernels, one per sample sigma [n]."""
    r = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(r[None, :] / tf.maximum(sigma[:, None], 1e-3)))
    return k / tf.reduce_sum(k, axis=1, keepdims=True)


def blur(images, *, blur_sigma=(0.5, 1.0), seed=None, active=None):
    """Gaussian blur with a per-sample sigma ~ U(blur_sigma) (pixels), separable, with
    reflected borders; an inactive sample gets a unit impulse. Each axis is a sum of 2r+1
    shifted copies weighted per sample: XLA fuses it into one loop (a depthwise convolution
    with one kernel per sample is ~50x slower there)."""
    n = batch_size(images)
    rank = images.shape.rank - 2
    radius = max(1, int(math.ceil(3 * blur_sigma[1])))
    sigma = tf.random.uniform([n], blur_sigma[0], blur_sigma[1], seed=seed)
    if active is not None:
        sigma = tf.where(active, sigma, 0.0)  # exp(-r^2 / 2e-6) = 0 off centre: identity
    kernels = _gaussian_kernels(sigma, radius)  # [n, 2r+1]
    out = images
    for axis in range(1, rank + 1):
        size = images.shape[axis]
        if size is None:
            raise ValueError(f"blur needs static spatial dims, got {images.shape}")
        widths = [[0, 0]] * (rank + 2)
        widths[axis] = [radius, radius]
        # SYMMETRIC padding needs radius <= size; tiny inputs fall back to edge clamping.
        padded = tf.pad(out, widths, mode="SYMMETRIC" if radius <= size else "CONSTANT")
        total = 0.0
        for k in range(2 * radius + 1):
            weight = tf.reshape(kernels[:, k], [-1] + [1] * (rank + 1))
            begin = [0] * (rank + 2)
            begin[axis] = k
            length = [-1] * (rank + 2)
            length[axis] = size
            total += weight * tf.slice(padded, begin, length)
        out = total
    return out


def fda(source, target, *, beta=0.01):
    """Fourier domain adaptation (Yang & Soatto, CVPR 2020, eq. 3): the source images keep
    their phase but take the target's amplitude in the low-frequency square of half-width
    floor(beta * min(spatial size)), pairing source i with target i. Works for 2D and 3D
    batches; labels are unaffected."""
    rank = source.shape.rank - 2
    spatial = source.shape[1:-1]
    if None in spatial or rank not in (2, 3):
        raise ValueError(f"fda needs static 2D/3D spatial dims, got {source.shape}")
    fft, ifft = (tf.signal.fft2d, tf.signal.ifft2d) if rank == 2 else (
        tf.signal.fft3d, tf.signal.ifft3d)
    to_first = [0, rank + 1] + list(range(1, rank + 1))  # channels before spatial axes
    back = [0] + list(range(2, rank + 2)) + [1]
    src = fft(tf.cast(tf.transpose(source, to_first), tf.complex64))
    tgt = fft(tf.cast(tf.transpose(target, to_first), tf.complex64))
    half = int(math.floor(beta * min(spatial)))
    # Low frequencies sit at the corners of an unshifted spectrum: |index| <= half, cyclically.
    masks = []
    for size in spatial:
        i = tf.range(size)
        masks.append(tf.minimum(i, size - i) <= half)
    low = masks[0]
    for m in masks[1:]:
        low = low[..., None] & m
    amplitude = tf.where(low, tf.abs(tgt), tf.abs(src))
    mixed = tf.cast(amplitude, tf.complex64) * tf.exp(
        tf.complex(tf.zeros_like(amplitude), tf.math.angle(src)))
    out = tf.math.real(ifft(mixed))
    return tf.transpose(out, back)
