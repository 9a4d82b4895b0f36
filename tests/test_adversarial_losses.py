"""Adversarial losses: values on hand-computed cases, and the WGAN-GP penalty on critics whose
input gradient is known in closed form."""
import math

import numpy as np
import pytest
import tensorflow as tf

from uda_tf import losses


def test_adversarial_loss_values_and_patch_averaging():
    out = tf.constant([[0.0], [2.0]])
    np.testing.assert_allclose(losses.adversarial_loss(out, 1.0, "bce"),
                               [math.log(2), math.log(1 + math.exp(-2))], rtol=1e-6)
    np.testing.assert_allclose(losses.adversarial_loss(out, 0.0, "bce"),
                               [math.log(2), math.log(1 + math.exp(2))], rtol=1e-6)
    np.testing.assert_allclose(losses.adversarial_loss(out, 1.0, "lsgan"), [1.0, 1.0])
    np.testing.assert_allclose(losses.adversarial_loss(out, 0.0, "lsgan"), [0.0, 4.0])
    # Wasserstein: the critic raises source scores (label 1 -> -D) and lowers target ones.
    np.testing.assert_allclose(losses.adversarial_loss(out, 1.0, "wgan-gp"), [0.0, -2.0])
    np.testing.assert_allclose(losses.adversarial_loss(out, 0.0, "wgan-gp"), [0.0, 2.0])
    patch = tf.reshape(tf.constant([1.0, 3.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), [2, 2, 2, 1])
    np.testing.assert_allclose(losses.adversarial_loss(patch, 0.0, "wgan-gp"), [1.0, 2.0])
    with pytest.raises(ValueError, match="'hinge'"):
        losses.adversarial_loss(out, 1.0, "hinge")


def test_gradient_penalty_of_a_linear_critic_is_norm_minus_one_squared():
    w = tf.constant([[3.0], [4.0]])  # D(x) = 3 x0 + 4 x1: gradient norm 5 everywhere
    critic = lambda x: tf.matmul(x, w)  # noqa: E731
    real = tf.constant([[1.0, 2.0], [0.0, -1.0], [5.0, 5.0]])
    fake = tf.constant([[0.0, 0.0], [7.0, 1.0], [-2.0, 3.0]])
    gp = losses.gradient_penalty(critic, real, fake, tf.constant([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(gp.numpy(), [16.0, 16.0, 16.0], rtol=1e-5)


def test_gradient_penalty_at_the_interpolate_of_a_quadratic_patch_critic():
    # D(x) = mean over a 2x1 map of x^2 per position: grad = x_hat (2 x_hat / 2 positions),
    # so the penalty is (||x_hat|| - 1)^2 with x_hat = eps real + (1 - eps) fake.
    critic = lambda x: tf.square(x)  # noqa: E731  (x: [N, 2, 1, 1] -> a 2x1 "patch" map)
    real = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    fake = np.array([[0.0, 0.0], [0.0, 2.0]], np.float32)
    eps = np.array([0.5, 0.25], np.float32)
    x_hat = eps[:, None] * real + (1 - eps[:, None]) * fake
    want = (np.linalg.norm(x_hat, axis=1) - 1.0) ** 2  # [(2.5-1)^2, (|(0.25,1.5)|-1)^2]
    gp = losses.gradient_penalty(critic, real.reshape(2, 2, 1, 1), fake.reshape(2, 2, 1, 1),
                                 eps)
    np.testing.assert_allclose(gp.numpy(), want, rtol=1e-5)
    assert abs(want[0] - 2.25) < 1e-6


def test_gradient_penalty_is_differentiable_in_the_critic_weights():
    v = tf.Variable([[2.0]])
    with tf.GradientTape() as tape:
        gp = losses.gradient_penalty(lambda x: tf.matmul(x, v), tf.ones([2, 1]),
                                     tf.zeros([2, 1]), tf.constant([0.3, 0.7]))
        total = tf.reduce_mean(gp)
    # (|v| - 1)^2 -> d/dv = 2 (v - 1) = 2
    np.testing.assert_allclose(tape.gradient(total, v).numpy(), [[2.0]], rtol=1e-5)


def test_mean_entropy_is_per_sample_and_in_unit_interval():
    logits = tf.stack([tf.zeros([4, 4, 3]), 50.0 * tf.one_hot(tf.zeros([4, 4], tf.int32), 3)])
    ent = losses.mean_entropy(logits).numpy()
    assert ent.shape == (2,)
    np.testing.assert_allclose(ent, [1.0, 0.0], atol=1e-5)
