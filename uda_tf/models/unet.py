"""2D residual U-Net that exposes its bottleneck features.

Three encoder blocks with channels doubling per block, a bottleneck, and a mirrored decoder,
after the residual U-Net used by Shirokikh et al., "First U-Net layers contain more domain
specific information than the last ones" (DART 2020). Tensors are NHWC (channels last).
"""
from __future__ import annotations

import keras

from uda_tf.models.layers import normalization


def _residual_block(x, filters, norm, sync, name):
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(x)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = normalization(norm, sync=sync, name=f"{name}_norm1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = normalization(norm, sync=sync, name=f"{name}_norm2")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def residual_unet_2d(input_shape, num_classes: int, *, base_filters: int = 16,
                     depth: int = 3, norm: str = "instance", sync_batchnorm: bool = False,
                     name: str = "segmentor") -> keras.Model:
    """Build the segmentor.

    Returns a functional model mapping images [N, H, W, C] to a dict with
    `logits` [N, H, W, num_classes], `features` (the bottleneck) [N, H/2^depth, W/2^depth,
    base_filters * 2^depth] and `encoder<k>` (the output of encoder block k, which the skip
    connection carries to the decoder) [N, H/2^k, W/2^k, base_filters * 2^k].
    H and W must be divisible by 2^depth.
    """
    h, w, _ = input_shape
    factor = 2 ** depth
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} must be divisible by {factor} for depth {depth}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = _residual_block(x, base_filters * 2 ** level, norm, sync_batchnorm, f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{level}")(x)
    features = _residual_block(x, base_filters * 2 ** depth, norm, sync_batchnorm, "bottleneck")
    x = features
    for level in reversed(range(depth)):
        filters = base_filters * 2 ** level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}")(x)
        x = keras.layers.Concatenate(name=f"cat{level}")([x, skips[level]])
        x = _residual_block(x, filters, norm, sync_batchnorm, f"dec{level}")
    logits = keras.layers.Conv2D(num_classes, 1, name="logits", dtype="float32")(x)
    encoder = {f"encoder{level}": skip for level, skip in enumerate(skips)}
    return keras.Model(inputs, {"logits": logits, "features": features, **encoder}, name=name)
