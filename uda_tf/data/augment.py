"""Augmentation as TF ops on batches (NHWC images, NHW labels), usable eagerly and in tf.data.

Each op draws one random value per sample so a batch mixes augmented and plain samples.
"""
from __future__ import annotations

import tensorflow as tf


def random_flip(images, labels=None, *, axis: int, seed=None):
    """Flip each sample along spatial `axis` (1 = H, 2 = W) with probability 1/2."""
    n = tf.shape(images)[0]
    flip = tf.random.uniform([n], seed=seed) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, [axis]), images)
    if labels is None:
        return images
    labels = tf.where(flip[:, None, None], tf.reverse(labels, [axis]), labels)
    return images, labels


def intensity_jitter(images, *, scale: float = 0.1, shift: float = 0.1, seed=None):
    """x * (1 + a) + b with a ~ U(-scale, scale), b ~ U(-shift, shift) per sample: a mild
    stand-in for scanner gain and offset differences."""
    n = tf.shape(images)[0]
    a = tf.random.uniform([n, 1, 1, 1], -scale, scale, seed=seed)
    b = tf.random.uniform([n, 1, 1, 1], -shift, shift, seed=None if seed is None else seed + 1)
    return images * (1.0 + a) + b


def augment_labelled(images, labels):
    """Flips along both in-plane axes and intensity jitter, for labelled batches."""
    images, labels = random_flip(images, labels, axis=1)
    images, labels = random_flip(images, labels, axis=2)
    return intensity_jitter(images), labels


def augment_unlabelled(images):
    images = random_flip(images, axis=1)
    images = random_flip(images, axis=2)
    return intensity_jitter(images)
