"""Dilated residual network segmentor (Yu, Koltun & Funkhouser, "Dilated Residual Networks",
CVPR 2017), the DRN-C-26 layout, rank-generic and registered for 2D slices.

DRN keeps the output at 1/8 of the input: the last two ResNet levels trade their striding for
dilation 2 and 4, so small structures are not lost to downsampling. Levels 7 and 8 are plain
(non-residual) convolutions with dilation 2 then 1, the paper's "degridding" against the
checkerboard artefacts of dilation. A 1x1 classifier and upsampling by 8 give full-resolution
logits (bilinear in 2D as in the paper; nearest in 3D, where Keras has no trilinear mode).
Channel counts are base_filters x (1, 2, 4, 8, 16, 32, 32, 32): DRN-C-26 with base 16.
"""
from __future__ import annotations

import keras

from uda_tf.models.blocks import check_divisible, conv_norm_act, layer, residual_block, \
    spatial_rank

# DRN-C-26 levels 2-6: (filter multiple of base_filters, residual blocks, stride, dilation).
_LEVELS = ((2, 1, 2, 1), (4, 2, 2, 1), (8, 2, 2, 1), (16, 2, 1, 2), (32, 2, 1, 4))


def drn(input_shape, num_classes: int, *, base_filters: int = 16, norm: str = "instance",
        sync_batchnorm: bool = False, name: str = "segmentor") -> keras.Model:
    """Outputs: `logits` [N, *spatial, num_classes]; `features`, the level-6 output (dilation
    4) [N, */8, 32 b]; `encoder0..2`, levels 2-4 [N, */2^(k+1), 2^(k+1) b]. Every spatial size
    must be divisible by 8."""
    rank = spatial_rank(input_shape)
    check_divisible(input_shape, 8, "DRN (output stride 8)")
    b, sync = base_filters, sync_batchnorm
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = conv_norm_act(inputs, b, 7, norm, sync, "level1_stem", rank=rank)
    x = residual_block(x, b, norm, sync, "level1", rank=rank)
    encoder = {}
    for i, (mult, blocks, stride, dilation) in enumerate(_LEVELS):
        for j in range(blocks):
            x = residual_block(x, mult * b, norm, sync, f"level{i + 2}_{j}", rank=rank,
                               strides=stride if j == 0 else 1, dilation=dilation)
        if i < 3:
            encoder[f"encoder{i}"] = x
    features = x
    for level, dilation in ((7, 2), (8, 1)):
        x = residual_block(x, 32 * b, norm, sync, f"level{level}", rank=rank, dilation=dilation,
                           residual=False)
    x = layer("conv", rank, num_classes, 1, name="classifier", dtype="float32")(x)
    up_kwargs = {"interpolation": "bilinear"} if rank == 2 else {}
    logits = layer("upsample", rank, 8, name="logits", dtype="float32", **up_kwargs)(x)
    return keras.Model(inputs, {"logits": logits, "features": features, **encoder}, name=name)
