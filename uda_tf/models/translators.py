"""Image-to-image translators and PatchGAN image discriminators for pixel-level adaptation
(CycleGAN and AttENT, uda_tf/methods/attent.py), 2D and 3D, channels last.

The translator is an encoder-decoder: a 7x7 stem, `depth` stride-2 downsampling convolutions,
residual blocks at the coarsest level, and a decoder that upsamples and concatenates the
encoder's features of the same level, as a U-Net does. With `attention`, each of those skip
paths passes through the additive attention gate of the attention U-Net (Oktay et al., MIDL
2018; `uda_tf.models.unet.attention_gate`), gated by the coarser decoder features: AttENT (Li
et al.) put such gates on the generators so that small structures survive the translation.
Without them this is a U-Net-style CycleGAN generator (Zhu et al., ICCV 2017, used a ResNet
generator without skips; the skips keep anatomy in place, which segmentation needs).

The output is the input plus a learned residual whose last convolution starts at zero: a new
translator is the identity, so a cycle through two new translators returns its input exactly
and the segmentor sees untranslated images until the translators have learnt something.
Every normalisation is instance normalisation (per sample, as CycleGAN), so a translator's
output for one image does not depend on the rest of the batch or on how it is split across
replicas.
"""
from __future__ import annotations

import keras

from uda_tf.models.blocks import check_divisible, layer, residual_block, spatial_rank
from uda_tf.models.layers import normalization
from uda_tf.models.unet import attention_gate


def _conv_in_act(x, filters, kernel, name, *, rank, strides=1, act="relu"):
    x = layer("conv", rank, filters, kernel, strides=strides, padding="same", use_bias=False,
              name=f"{name}_conv")(x)
    x = normalization("instance", name=f"{name}_norm")(x)
    if act == "lrelu":
        return keras.layers.LeakyReLU(0.2, name=f"{name}_lrelu")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def translator(input_shape, *, filters: int = 16, depth: int = 2, residual_blocks: int = 3,
               attention: bool = True, name: str = "translator") -> keras.Model:
    """Image [N, *spatial, C] -> translated image of the same shape (see the module docstring).
    Every spatial size must be divisible by 2^depth."""
    rank = spatial_rank(input_shape)
    if depth < 1 or filters < 1 or residual_blocks < 0:
        raise ValueError(f"translator: depth {depth} and filters {filters} must be >= 1, "
                         f"residual_blocks {residual_blocks} >= 0")
    check_divisible(input_shape, 2 ** depth, f"translator depth {depth}")
    channels = int(input_shape[-1])
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_in_act(inputs, filters, 7, f"{name}_stem", rank=rank)
    skips = []
    for level in range(depth):
        skips.append(x)
        x = _conv_in_act(x, filters * 2 ** (level + 1), 3, f"{name}_down{level}", rank=rank,
                         strides=2)
    for i in range(residual_blocks):
        x = residual_block(x, filters * 2 ** depth, "instance", False, f"{name}_res{i}",
                           rank=rank)
    for level in reversed(range(depth)):
        skip = skips[level]
        if attention:
            skip = attention_gate(skip, x, f"{name}_att{level}", rank=rank)
        x = layer("deconv", rank, filters * 2 ** level, 3, strides=2, padding="same",
                  use_bias=False, name=f"{name}_up{level}")(x)
        x = normalization("instance", name=f"{name}_up{level}_norm")(x)
        x = keras.layers.ReLU(name=f"{name}_up{level}_relu")(x)
        x = keras.layers.Concatenate(name=f"{name}_cat{level}")([x, skip])
        x = _conv_in_act(x, filters * 2 ** level, 3, f"{name}_dec{level}", rank=rank)
    residual = layer("conv", rank, channels, 7, padding="same", kernel_initializer="zeros",
                     name=f"{name}_residual", dtype="float32")(x)
    image = keras.layers.Activation("linear", dtype="float32", name=f"{name}_image_f32")(inputs)
    out = keras.layers.Add(name=f"{name}_out", dtype="float32")([image, residual])
    return keras.Model(inputs, out, name=name)


def patch_discriminator(input_shape, *, filters: int = 32, layers: int = 3,
                        name: str = "image_disc") -> keras.Model:
    """Image -> map of real/fake logits, one per overlapping patch: the PatchGAN of Isola et
    al. (CVPR 2017) that CycleGAN uses, 4x4 convolutions with LeakyReLU 0.2 and instance
    normalisation after the first; `layers` stride-2 convolutions, then a stride-1 one and a
    one-channel logit convolution (with layers=3 and 2D input, 70x70 receptive fields)."""
    rank = spatial_rank(input_shape)
    if layers < 1 or filters < 1:
        raise ValueError(f"patch discriminator: layers {layers} and filters {filters} must be "
                         ">= 1")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layer("conv", rank, filters, 4, strides=2, padding="same", name=f"{name}_conv0")(inputs)
    x = keras.layers.LeakyReLU(0.2, name=f"{name}_lrelu0")(x)
    for i in range(1, layers):
        x = _conv_in_act(x, filters * 2 ** min(i, 3), 4, f"{name}_block{i}", rank=rank,
                         strides=2, act="lrelu")
    x = _conv_in_act(x, filters * 2 ** min(layers, 3), 4, f"{name}_block{layers}", rank=rank,
                     act="lrelu")
    logits = layer("conv", rank, 1, 4, padding="same", name=f"{name}_logit", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
