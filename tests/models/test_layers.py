import numpy as np
import pytest
import tensorflow as tf

from uda_tf.models.layers import GradientReversal, normalization


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_gradient_reversal_is_identity_forward_and_negates_gradient(lam):
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 5)), tf.float32)
    w = tf.constant(np.random.default_rng(1).normal(size=(3, 5)), tf.float32)
    layer = GradientReversal()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, lam=lam)
        loss = tf.reduce_sum(w * y)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -lam * w.numpy(), rtol=1e-6)


def test_gradient_reversal_inside_tf_function():
    layer = GradientReversal()

    @tf.function
    def grad(x, lam):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(3.0 * layer(x, lam=lam))
        return tape.gradient(y, x)

    np.testing.assert_allclose(grad(tf.ones([2]), tf.constant(0.5)).numpy(), [-1.5, -1.5])


def test_unknown_normalization_is_named():
    with pytest.raises(ValueError, match="'layer'"):
        normalization("layer")
