"""Segmentation heads: what the logits channel axis means and how it becomes probabilities.

* `softmax`: K logits per voxel, one per class (multi-class).
* `sigmoid`: one logit per voxel, the foreground probability of a two-class problem
  (background / foreground); only for num_classes == 2.

The head is visible from the logits alone (one channel means sigmoid, since a one-class softmax
is constant), so losses, metrics and the exported SavedModel need no extra setting: they call
`class_probabilities`, which always returns K = num_classes probabilities summing to 1.
"""
from __future__ import annotations

import tensorflow as tf

HEADS = ("softmax", "sigmoid")


def output_channels(head: str, num_classes: int) -> int:
    """Logit channels of the segmentor for `--head` and the dataset's class count."""
    if head not in HEADS:
        raise ValueError(f"--head={head!r}: expected one of {', '.join(HEADS)}")
    if head == "sigmoid":
        if num_classes != 2:
            raise ValueError(f"--head=sigmoid needs a two-class dataset (background and one "
                             f"foreground class); this one has num_classes={num_classes}: use "
                             "--head=softmax")
        return 1
    return num_classes


def is_sigmoid(logits) -> bool:
    return logits.shape[-1] == 1


def class_probabilities(logits):
    """[..., K] logits (softmax head) or [..., 1] (sigmoid head) -> [..., K] probabilities,
    K = 2 for the sigmoid head (background = 1 - foreground)."""
    logits = tf.cast(logits, tf.float32)
    if is_sigmoid(logits):
        foreground = tf.sigmoid(logits)
        return tf.concat([1.0 - foreground, foreground], axis=-1)
    return tf.nn.softmax(logits, axis=-1)


def parse_class_weights(value, num_classes: int) -> list[float] | None:
    """`--class_weights` (a list or a comma string; empty: none) -> floats, one per class."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        weights = [float(w) for w in items]
    except ValueError:
        raise ValueError(f"--class_weights={value!r}: expected comma-separated numbers") from None
    if len(weights) != num_classes:
        raise ValueError(f"--class_weights has {len(weights)} values but the dataset has "
                         f"num_classes={num_classes}: give one weight per class, background "
                         "first")
    if min(weights) < 0 or max(weights) <= 0:
        raise ValueError(f"--class_weights={value!r}: weights must be >= 0 and not all zero")
    return weights
