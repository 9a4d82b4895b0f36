"""Domain classifiers."""
from __future__ import annotations

import keras

from uda_tf.models.blocks import layer


def domain_classifier(feature_shapes, hidden=(128, 64), reduce_channels=16,
                      name="domain_classifier") -> keras.Model:
    """Encoder features -> domain logit (1 = source, 0 = target).

    `feature_shapes` is one feature-map shape, (H, W, C) or (H, W, D, C), or a list of them
    (several encoder levels, finest first); each map is average-pooled to the coarsest
    resolution and reduced by a 1x1 convolution (2D or 3D after the shapes), then the
    concatenation goes through dense layers, as in the GRL entry of crossMoDA 2021 (features
    -> three dense layers -> logit). Flattening rather than global pooling matters: with
    instance normalisation every channel's spatial mean is nearly fixed, so a pooled head
    cannot tell domains apart. Several levels matter for U-Nets: skip
    connections carry early, most domain-specific features (Shirokikh et al. 2020) around the
    bottleneck to the decoder.
    """
    single = not isinstance(feature_shapes[0], (tuple, list))
    shapes = [tuple(feature_shapes)] if single else [tuple(s) for s in feature_shapes]
    rank = len(shapes[0]) - 1
    if any(len(s) != rank + 1 or None in s for s in shapes):
        raise ValueError(f"domain classifier: feature shapes {shapes} must all be fully known "
                         "and of one rank ((H, W, C) or (H, W, D, C))")
    coarsest = [min(s[a] for s in shapes) for a in range(rank)]
    inputs, parts = [], []
    for i, shape in enumerate(shapes):
        x = inp = keras.Input(shape=shape, name=f"features{i}")
        factors = tuple(n // c for n, c in zip(shape[:rank], coarsest))
        if any(f != n / c for f, n, c in zip(factors, shape[:rank], coarsest)):
            raise ValueError(f"domain classifier: feature map {shape} is not an integer "
                             f"multiple of the coarsest grid {coarsest}")
        if max(factors) > 1:
            x = layer("avgpool", rank, factors, name=f"pool{i}")(x)
        x = layer("conv", rank, reduce_channels, 1, activation="relu", name=f"reduce{i}")(x)
        inputs.append(inp)
        parts.append(x)
    x = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="concat")(parts)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
    logit = keras.layers.Dense(1, name="logit", dtype="float32")(x)
    return keras.Model(inputs[0] if single else inputs, logit, name=name)


# -- GAN-style discriminators for the adversarial method (issue 4) ----------------------------
# Each maps its input to a logit per sample ([N, 1]) or, as a fully convolutional "patch"
# discriminator, to a map of logits ([N, h, w, 1]) that judges each receptive field on its
# own. The sigmoid of the papers lives in the loss (losses.adversarial_loss), which keeps BCE
# numerically stable and lets LSGAN and WGAN-GP use the same networks. No normalisation layers:
# the WGAN-GP penalty needs samples that do not interact inside the critic. Every network is
# 2D or 3D after its input shape ((H, W, C) or (H, W, D, C)): 3D models get 3D discriminators.

def _spatial_input(shape, name, what):
    shape = tuple(shape)
    if len(shape) not in (3, 4) or None in shape:
        raise ValueError(f"{what}: input shape {shape} must be fully known (H, W, C) or "
                         "(H, W, D, C)")
    return keras.Input(shape=shape, name=name), len(shape) - 1


def _conv_stack(x, filters, prefix, rank):
    for i, f in enumerate(filters):
        x = layer("conv", rank, f, 3, strides=2, padding="same", activation="relu",
                  name=f"{prefix}conv{i}")(x)
    return x


def _head(x, hidden, patch, prefix, rank):
    if patch:
        return layer("conv", rank, 1, 3, padding="same", name=f"{prefix}logit",
                     dtype="float32")(x)
    x = keras.layers.Flatten(name=f"{prefix}flatten")(x)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}dense{i}")(x)
    return keras.layers.Dense(1, name=f"{prefix}logit", dtype="float32")(x)


def feature_discriminator(feature_shape, *, filters=(64, 64, 64), hidden=(64,), patch=False,
                          name="feature_disc") -> keras.Model:
    """Bottleneck features -> domain logit: 3 strided conv + ReLU, dense 64, logit (the
    feature-map discriminator of entropy-guided UDA, Zeng et al., MICCAI 2020). With `patch`,
    a 3x3 convolution replaces the dense layers and the output is a logit map."""
    if len(filters) != 3:
        raise ValueError(f"the feature discriminator has 3 conv layers, got filters={filters}")
    inp, rank = _spatial_input(feature_shape, "features", "feature discriminator")
    x = _conv_stack(inp, filters, f"{name}_", rank)
    return keras.Model(inp, _head(x, hidden, patch, f"{name}_", rank), name=name)


def entropy_discriminator(map_shape, *, filters=(16, 32, 64, 64, 64), hidden=(512, 64),
                          patch=False, name="entropy_disc") -> keras.Model:
    """Entropy map [H, W(, D), 1] -> domain logit: 5 strided conv + ReLU, dense 512, dense 64,
    logit (the entropy-map discriminator of Zeng et al., MICCAI 2020, after AdvEnt, Vu et al., CVPR
    2019). With `patch`, a 3x3 convolution replaces the dense layers (AdvEnt's fully
    convolutional discriminator) and the output is a logit map at 1/32 resolution."""
    if len(filters) != 5:
        raise ValueError(f"the entropy discriminator has 5 conv layers, got filters={filters}")
    inp, rank = _spatial_input(map_shape, "entropy", "entropy discriminator")
    x = _conv_stack(inp, filters, f"{name}_", rank)
    return keras.Model(inp, _head(x, hidden, patch, f"{name}_", rank), name=name)


def output_domain_classifier(output_shape, *, filters=(16, 32, 64, 64), hidden=(64,),
                             name="output_classifier") -> keras.Model:
    """Class-probability maps [H, W(, D), C] -> domain logit: strided conv + ReLU, dense,
    logit (the CNN domain classifier on segmentation outputs of Javanmardi & Tasdizen, ISBI
    2018)."""
    inp, rank = _spatial_input(output_shape, "probabilities", "output domain classifier")
    x = _conv_stack(inp, filters, f"{name}_", rank)
    return keras.Model(inp, _head(x, hidden, False, f"{name}_", rank), name=name)
