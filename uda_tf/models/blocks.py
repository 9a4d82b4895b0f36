"""Building blocks shared by the 2D and 3D segmentors. The spatial rank (2 or 3) is read from
the input shape once, and every block picks the matching Keras layer from `_LAYERS`, so one
builder serves slices [N, H, W, C] and patches [N, H, W, D, C] (channels last throughout)."""
from __future__ import annotations

import keras

from uda_tf.models.layers import normalization

_LAYERS = {
    2: {"conv": keras.layers.Conv2D, "deconv": keras.layers.Conv2DTranspose,
        "maxpool": keras.layers.MaxPooling2D, "avgpool": keras.layers.AveragePooling2D,
        "upsample": keras.layers.UpSampling2D, "dropout": keras.layers.SpatialDropout2D},
    3: {"conv": keras.layers.Conv3D, "deconv": keras.layers.Conv3DTranspose,
        "maxpool": keras.layers.MaxPooling3D, "avgpool": keras.layers.AveragePooling3D,
        "upsample": keras.layers.UpSampling3D, "dropout": keras.layers.SpatialDropout3D},
}


def spatial_rank(input_shape) -> int:
    """2 for (H, W, C), 3 for (H, W, D, C); anything else is an error naming the shape."""
    rank = len(tuple(input_shape)) - 1
    if rank not in _LAYERS:
        raise ValueError(f"input shape {tuple(input_shape)}: expected (H, W, C) or (H, W, D, C)")
    return rank


def layer(kind: str, rank: int, *args, **kwargs):
    """The `kind` layer ("conv", "deconv", "maxpool", ...) for spatial rank 2 or 3."""
    return _LAYERS[rank][kind](*args, **kwargs)


def check_divisible(input_shape, factor: int, what: str) -> None:
    spatial = tuple(input_shape)[:-1]
    if any(n is None or n % factor for n in spatial):
        size = "x".join(str(n) for n in spatial)
        raise ValueError(f"input size {size} must be divisible by {factor} for {what}")


def conv_norm_act(x, filters, kernel, norm, sync, name, *, rank, dilation=1, strides=1,
                  activation="relu"):
    x = layer("conv", rank, filters, kernel, strides=strides, padding="same",
              dilation_rate=dilation, use_bias=False, name=f"{name}_conv")(x)
    x = normalization(norm, sync=sync, name=f"{name}_norm", channels=filters)(x)
    if activation == "prelu":
        # shared_axes: one slope per channel, as ENet's PReLU (Paszke et al. 2016, sec. 4)
        return keras.layers.PReLU(shared_axes=list(range(1, rank + 1)), name=f"{name}_prelu")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if activation == "relu" else x


def residual_block(x, filters, norm, sync, name, *, rank, dilation=1, strides=1,
                   residual=True):
    """Two 3x3 convolutions with normalisation and a (projected) identity shortcut (He et al.
    2016). `residual=False` drops the shortcut (DRN's degridding layers)."""
    shortcut = x
    if residual and (x.shape[-1] != filters or strides != 1):
        shortcut = layer("conv", rank, filters, 1, strides=strides, use_bias=False,
                         name=f"{name}_proj")(x)
    y = layer("conv", rank, filters, 3, strides=strides, padding="same", dilation_rate=dilation,
              use_bias=False, name=f"{name}_conv1")(x)
    y = normalization(norm, sync=sync, name=f"{name}_norm1", channels=filters)(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = layer("conv", rank, filters, 3, padding="same", dilation_rate=dilation, use_bias=False,
              name=f"{name}_conv2")(y)
    y = normalization(norm, sync=sync, name=f"{name}_norm2", channels=filters)(y)
    if residual:
        y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)
