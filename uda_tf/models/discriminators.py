"""Domain classifiers."""
from __future__ import annotations

import keras

from uda_tf.models.blocks import layer


def domain_classifier(feature_shapes, hidden=(128, 64), reduce_channels=16,
                      name="domain_classifier") -> keras.Model:
    """Encoder features -> domain logit (1 = source, 0 = target).

    `feature_shapes` is one feature-map shape, (H, W, C) or (H, W, D, C), or a list of them
    (several encoder levels, finest first); each map is average-pooled to the coarsest
    resolution and reduced by a 1x1 convolution (2D or 3D after the shapes), then the concatenation goes through dense layers, as in the GRL entry of
    crossMoDA 2021 (features -> three dense layers -> logit). Flattening rather than global
    pooling matters: with instance normalisation every channel's spatial mean is nearly fixed,
    so a pooled head cannot tell domains apart. Several levels matter for U-Nets: skip
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
