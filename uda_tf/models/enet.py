"""ENet (Paszke et al., "ENet: A deep neural network architecture for real-time semantic
segmentation", 2016), rank-generic and registered for 3D patches.

3D ENet is the light segmentor of the crossMoDA 2021 entries built on AttENT-style pipelines
(vestibular schwannoma and cochlea on 3D patches). The layout follows the paper's Table 1:
initial block (1/2), stage 1 (downsampling bottleneck + 4 regular, 1/4), stages 2 and 3 (regular,
dilated 2/4/8/16 and asymmetric bottlenecks, 1/8), then two upsampling stages and a transposed
convolution back to full resolution. Channel counts scale with `base_filters` (16 in the paper:
16 -> 64 -> 128).

Changes from the paper, where 3D or Keras ask for them:
- asymmetric 5x1 + 1x5 convolutions become one 5-tap convolution per spatial axis;
- the downsampling shortcut projects channels with a 1x1 convolution (ResNet option B) rather
  than zero-padding them;
- max-unpooling with stored indices becomes nearest upsampling of the projected shortcut;
- the normalisation layer is the run's `--norm` choice (the paper uses batch norm).
"""
from __future__ import annotations

import keras

from uda_tf.models.blocks import check_divisible, conv_norm_act, layer, spatial_rank
from uda_tf.models.layers import normalization

# Stage 2 (and 3, without its downsampling) of the paper's Table 1: (kind, dilation).
_STAGE2 = (("regular", 1), ("dilated", 2), ("asymmetric", 1), ("dilated", 4),
           ("regular", 1), ("dilated", 8), ("asymmetric", 1), ("dilated", 16))


def _bottleneck(x, filters, kind, norm, sync, name, *, rank, dilation=1, dropout=0.1):
    """Projection (1x1, or 2x2 stride 2 when downsampling) -> main convolution -> 1x1
    expansion -> spatial dropout, added to the shortcut, then PReLU (paper Fig. 2b)."""
    inner = max(filters // 4, 1)
    shortcut = x
    if kind == "down":
        shortcut = layer("maxpool", rank, 2, name=f"{name}_pool")(x)
        shortcut = layer("conv", rank, filters, 1, use_bias=False, name=f"{name}_short")(shortcut)
    elif kind == "up":
        shortcut = layer("conv", rank, filters, 1, use_bias=False, name=f"{name}_short")(x)
        shortcut = normalization(norm, sync=sync, name=f"{name}_short_norm",
                                 channels=filters)(shortcut)
        shortcut = layer("upsample", rank, 2, name=f"{name}_unpool")(shortcut)
    y = conv_norm_act(x, inner, 2 if kind == "down" else 1, norm, sync, f"{name}_proj", rank=rank,
                      strides=2 if kind == "down" else 1, activation="prelu")
    if kind == "up":
        y = layer("deconv", rank, inner, 3, strides=2, padding="same", use_bias=False,
                  name=f"{name}_deconv")(y)
        y = normalization(norm, sync=sync, name=f"{name}_deconv_norm", channels=inner)(y)
        y = keras.layers.PReLU(shared_axes=list(range(1, rank + 1)), name=f"{name}_deconv_prelu")(y)
    elif kind == "asymmetric":
        for axis in range(rank):
            kernel = tuple(5 if a == axis else 1 for a in range(rank))
            y = layer("conv", rank, inner, kernel, padding="same", use_bias=False,
                      name=f"{name}_asym{axis}")(y)
        y = normalization(norm, sync=sync, name=f"{name}_asym_norm", channels=inner)(y)
        y = keras.layers.PReLU(shared_axes=list(range(1, rank + 1)), name=f"{name}_asym_prelu")(y)
    else:  # regular, dilated, down
        y = conv_norm_act(y, inner, 3, norm, sync, f"{name}_main", rank=rank, dilation=dilation,
                          activation="prelu")
    y = layer("conv", rank, filters, 1, use_bias=False, name=f"{name}_expand")(y)
    y = normalization(norm, sync=sync, name=f"{name}_expand_norm", channels=filters)(y)
    if dropout:
        y = layer("dropout", rank, dropout, name=f"{name}_drop")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.PReLU(shared_axes=list(range(1, rank + 1)), name=f"{name}_out")(y)


def enet(input_shape, num_classes: int, *, base_filters: int = 16, norm: str = "batch",
         sync_batchnorm: bool = False, dropout: float = 0.1, stage1_blocks: int = 4,
         stage2=_STAGE2, stage3: bool = True, name: str = "segmentor") -> keras.Model:
    """ENet for slices (H, W, C) or patches (H, W, D, C); every spatial size divisible by 8.

    Outputs: `logits` at full resolution; `features`, the stage-3 output [N, */8, 8 b];
    `encoder0` (initial block, */2, b), `encoder1` (stage 1, */4, 4 b), `encoder2` (stage 2,
    */8, 8 b), with b = base_filters. `dropout` is the paper's 0.1 (0.01 in stage 1).
    `stage1_blocks`, `stage2` ((kind, dilation) per bottleneck) and `stage3` (repeat stage 2)
    default to the paper's layout; smaller values make a shallower ENet (the tests use one,
    since tracing the full 3D network on two replicas takes minutes on a CPU)."""
    rank = spatial_rank(input_shape)
    check_divisible(input_shape, 8, "ENet (three downsamplings)")
    sync = sync_batchnorm
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    # Initial block: a stride-2 convolution beside a max-pool of the input, concatenated.
    conv = layer("conv", rank, max(base_filters - input_shape[-1], 1), 3, strides=2,
                 padding="same", use_bias=False, name="initial_conv")(inputs)
    pooled = layer("maxpool", rank, 2, name="initial_pool")(inputs)
    x = keras.layers.Concatenate(name="initial_cat")([conv, pooled])
    x = normalization(norm, sync=sync, name="initial_norm", channels=x.shape[-1])(x)
    x = keras.layers.PReLU(shared_axes=list(range(1, rank + 1)), name="initial_prelu")(x)
    encoder = {"encoder0": x}
    wide, widest = 4 * base_filters, 8 * base_filters
    x = _bottleneck(x, wide, "down", norm, sync, "b1_0", rank=rank, dropout=dropout / 10)
    for i in range(1, stage1_blocks + 1):
        x = _bottleneck(x, wide, "regular", norm, sync, f"b1_{i}", rank=rank, dropout=dropout / 10)
    encoder["encoder1"] = x
    x = _bottleneck(x, widest, "down", norm, sync, "b2_0", rank=rank, dropout=dropout)
    for stage in (2, 3) if stage3 else (2,):
        for i, (kind, dilation) in enumerate(stage2, start=1):
            x = _bottleneck(x, widest, kind, norm, sync, f"b{stage}_{i}", rank=rank,
                            dilation=dilation, dropout=dropout)
        if stage == 2 and stage3:
            encoder["encoder2"] = x
    features = x
    x = _bottleneck(x, wide, "up", norm, sync, "b4_0", rank=rank, dropout=dropout)
    for i in (1, 2):
        x = _bottleneck(x, wide, "regular", norm, sync, f"b4_{i}", rank=rank, dropout=dropout)
    x = _bottleneck(x, base_filters, "up", norm, sync, "b5_0", rank=rank, dropout=dropout)
    x = _bottleneck(x, base_filters, "regular", norm, sync, "b5_1", rank=rank, dropout=dropout)
    logits = layer("deconv", rank, num_classes, 2, strides=2, name="logits", dtype="float32")(x)
    return keras.Model(inputs, {"logits": logits, "features": features, **encoder}, name=name)
