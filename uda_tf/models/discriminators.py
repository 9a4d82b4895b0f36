"""Domain classifiers."""
from __future__ import annotations

import keras


def domain_classifier(feature_shape, hidden=(128, 64), reduce_channels=16,
                      name="domain_classifier") -> keras.Model:
    """Encoder features -> domain logit (1 = source, 0 = target).

    Dense layers on the flattened feature map, as in the GRL entry of crossMoDA 2021 (features
    -> three dense layers -> logit), after a 1x1 convolution that keeps the first dense layer
    small. Flattening rather than global pooling matters: with instance normalisation every
    channel's spatial mean is nearly fixed, so a pooled head cannot tell domains apart.
    """
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = keras.layers.Conv2D(reduce_channels, 1, activation="relu", name="reduce")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
    logit = keras.layers.Dense(1, name="logit", dtype="float32")(x)
    return keras.Model(inputs, logit, name=name)
