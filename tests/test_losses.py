import math

import numpy as np
import tensorflow as tf

from uda_tf import losses


def test_soft_dice_is_zero_for_perfect_prediction_and_one_for_disjoint():
    labels = np.zeros((1, 4, 4), np.int32)
    labels[0, :2] = 1
    perfect = tf.one_hot(labels, 2)
    assert abs(float(losses.soft_dice_loss(labels, perfect, smooth=0.0)[0])) < 1e-7
    wrong = tf.one_hot(1 - labels, 2)
    assert abs(float(losses.soft_dice_loss(labels, wrong, smooth=0.0)[0]) - 1.0) < 1e-7


def test_losses_are_per_sample():
    labels = np.zeros((3, 4, 4), np.int32)
    logits = tf.random.stateless_normal((3, 4, 4, 2), seed=[1, 2])
    assert losses.dice_ce_loss(labels, logits).shape == (3,)
    assert losses.binary_cross_entropy(tf.ones([3]), tf.zeros([3, 1])).shape == (3,)
    np.testing.assert_allclose(losses.binary_cross_entropy(tf.ones([3]), tf.zeros([3, 1])),
                               [math.log(2)] * 3, rtol=1e-6)


def test_entropy_map_is_normalised():
    uniform = tf.fill([2, 3, 5], 0.2)
    np.testing.assert_allclose(losses.entropy_map(uniform).numpy(), 1.0, rtol=1e-5)
    certain = tf.one_hot(tf.zeros([2, 3], tf.int32), 5)
    assert float(tf.reduce_max(losses.entropy_map(certain))) < 1e-6
