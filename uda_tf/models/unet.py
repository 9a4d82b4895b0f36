"""Residual U-Nets, 2D and 3D, optionally with attention gates on the skip connections.

Encoder blocks with channels doubling per block, a bottleneck, and a mirrored decoder, after
the residual U-Net used by Shirokikh et al., "First U-Net layers contain more domain specific
information than the last ones" (DART 2020). In 3D this is the 3D U-Net of Çiçek et al.,
"3D U-Net: learning dense volumetric segmentation from sparse annotation" (MICCAI 2016), with
residual blocks. `attention=True` adds the additive attention gates of Oktay et al.,
"Attention U-Net: Learning where to look for the pancreas" (MIDL 2018). Tensors are channels
last: NHWC or NDHWC.
"""
from __future__ import annotations

import keras

from uda_tf.models.blocks import check_divisible, layer, residual_block, spatial_rank


def attention_gate(skip, gating, name, *, rank):
    """Oktay et al. 2018, eqs. 1-2: alpha = sigmoid(psi(relu(W_x x + W_g g))), output alpha x.

    The skip features x are brought to the gating signal's (coarser) grid by a stride-2
    projection, and the one-channel coefficients alpha are upsampled back, as in the paper;
    the gate lets the coarse decoder context switch off skip features in irrelevant regions."""
    inter = max(skip.shape[-1] // 2, 1)
    theta_x = layer("conv", rank, inter, 2, strides=2, use_bias=False, name=f"{name}_theta")(skip)
    phi_g = layer("conv", rank, inter, 1, name=f"{name}_phi")(gating)
    q = keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([theta_x, phi_g]))
    alpha = layer("conv", rank, 1, 1, activation="sigmoid", name=f"{name}_psi")(q)
    # Nearest in 3D (UpSampling3D has no trilinear mode); bilinear in 2D as in the paper.
    up_kwargs = {"interpolation": "bilinear"} if rank == 2 else {}
    alpha = layer("upsample", rank, 2, name=f"{name}_up", **up_kwargs)(alpha)
    return keras.layers.Multiply(name=f"{name}_gated")([skip, alpha])


def residual_unet(input_shape, num_classes: int, *, base_filters: int = 16, depth: int = 3,
                  norm: str = "instance", sync_batchnorm: bool = False, attention: bool = False,
                  name: str = "segmentor") -> keras.Model:
    """Build the segmentor for slices (H, W, C) or patches (H, W, D, C).

    Returns a functional model mapping images to a dict with `logits` [N, *spatial,
    num_classes], `features` (the bottleneck) [N, *spatial / 2^depth, base_filters * 2^depth]
    and `encoder<k>` (the output of encoder block k, which the skip connection carries to the
    decoder) [N, *spatial / 2^k, base_filters * 2^k]. Every spatial size must be divisible by
    2^depth.
    """
    rank = spatial_rank(input_shape)
    check_divisible(input_shape, 2 ** depth, f"depth {depth}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = residual_block(x, base_filters * 2 ** level, norm, sync_batchnorm, f"enc{level}",
                           rank=rank)
        skips.append(x)
        x = layer("maxpool", rank, 2, name=f"pool{level}")(x)
    features = residual_block(x, base_filters * 2 ** depth, norm, sync_batchnorm, "bottleneck",
                              rank=rank)
    x = features
    for level in reversed(range(depth)):
        filters = base_filters * 2 ** level
        skip = attention_gate(skips[level], x, f"att{level}", rank=rank) if attention \
            else skips[level]
        x = layer("deconv", rank, filters, 2, strides=2, name=f"up{level}")(x)
        x = keras.layers.Concatenate(name=f"cat{level}")([x, skip])
        x = residual_block(x, filters, norm, sync_batchnorm, f"dec{level}", rank=rank)
    logits = layer("conv", rank, num_classes, 1, name="logits", dtype="float32")(x)
    encoder = {f"encoder{level}": skip for level, skip in enumerate(skips)}
    return keras.Model(inputs, {"logits": logits, "features": features, **encoder}, name=name)


def residual_unet_2d(input_shape, num_classes: int, **kwargs) -> keras.Model:
    """The 2D residual U-Net; `input_shape` is (H, W, C)."""
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"residual_unet_2d takes slices (H, W, C), got {tuple(input_shape)}")
    return residual_unet(input_shape, num_classes, **kwargs)
