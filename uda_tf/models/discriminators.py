"""Domain classifiers."""
from __future__ import annotations

import keras


def domain_classifier(feature_shapes, hidden=(128, 64), reduce_channels=16,
                      name="domain_classifier") -> keras.Model:
    """Encoder features -> domain logit (1 = source, 0 = target).

    `feature_shapes` is one feature-map shape (H, W, C) or a list of them (several encoder
    levels, finest first); each map is average-pooled to the coarsest resolution and reduced by
    a 1x1 convolution, then the concatenation goes through dense layers, as in the GRL entry of
    crossMoDA 2021 (features -> three dense layers -> logit). Flattening rather than global
    pooling matters: with instance normalisation every channel's spatial mean is nearly fixed,
    so a pooled head cannot tell domains apart. Several levels matter for U-Nets: skip
    connections carry early, most domain-specific features (Shirokikh et al. 2020) around the
    bottleneck to the decoder.
    """
    single = not isinstance(feature_shapes[0], (tuple, list))
    shapes = [tuple(feature_shapes)] if single else [tuple(s) for s in feature_shapes]
    coarsest = min(s[0] for s in shapes)
    inputs, parts = [], []
    for i, shape in enumerate(shapes):
        x = inp = keras.Input(shape=shape, name=f"features{i}")
        if shape[0] > coarsest:
            x = keras.layers.AveragePooling2D(shape[0] // coarsest, name=f"pool{i}")(x)
        x = keras.layers.Conv2D(reduce_channels, 1, activation="relu", name=f"reduce{i}")(x)
        inputs.append(inp)
        parts.append(x)
    x = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="concat")(parts)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
    logit = keras.layers.Dense(1, name="logit", dtype="float32")(x)
    return keras.Model(inputs[0] if single else inputs, logit, name=name)
