"""Domain classifiers."""
from __future__ import annotations

import keras


def domain_classifier(feature_shape, hidden=(128, 64), name="domain_classifier") -> keras.Model:
    """Encoder features -> domain logit (1 = source, 0 = target).

    Global average pooling then dense layers, as in the GRL entry of crossMoDA 2021 (features
    -> three dense layers -> logit); pooling keeps the head small whatever the image size.
    """
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
    logit = keras.layers.Dense(1, name="logit", dtype="float32")(x)
    return keras.Model(inputs, logit, name=name)
