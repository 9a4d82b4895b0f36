"""The sigmoid head, class weights and 3D inputs in the supervised loss and the streaming Dice,
checked against hand-computed values."""
import math

import numpy as np
import pytest
import tensorflow as tf

from uda_tf import losses
from uda_tf.metrics import StreamingDice
from uda_tf.models.heads import class_probabilities, output_channels, parse_class_weights


def test_sigmoid_head_loss_by_hand():
    # one sample, two pixels (background, foreground), foreground logit 0: p = 0.5 each
    labels = np.array([[[0, 1]]], np.int32)
    logits = tf.zeros([1, 1, 2, 1])
    # BCE = log 2 per pixel; soft Dice of the foreground: (2 x 0.5 + 1) / (1 + 1 + 1) = 2/3
    expected = math.log(2) + (1 - 2 / 3)
    np.testing.assert_allclose(losses.dice_ce_loss(labels, logits), [expected], rtol=1e-6)
    np.testing.assert_allclose(losses.dice_ce_loss(labels, logits, dice_weight=0),
                               [math.log(2)], rtol=1e-6)


def test_sigmoid_logit_equals_two_class_softmax_with_zero_background_logit():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (3, 4, 5)).astype(np.int32)
    z = rng.normal(size=(3, 4, 5, 1)).astype(np.float32)
    two = np.concatenate([np.zeros_like(z), z], -1)
    np.testing.assert_allclose(class_probabilities(z), tf.nn.softmax(two), rtol=1e-6)
    np.testing.assert_allclose(losses.dice_ce_loss(labels, z, class_weights=[0.3, 2.0]),
                               losses.dice_ce_loss(labels, two, class_weights=[0.3, 2.0]),
                               rtol=1e-5)


def test_class_weights_by_hand():
    labels = np.array([[[0, 1, 1]]], np.int32)  # three pixels, uniform prediction over 3 classes
    logits = tf.zeros([1, 1, 3, 3])
    w = [0.5, 1.0, 2.0]
    # CE: log 3 per pixel, times its true class's weight, mean over pixels
    ce = (0.5 + 1 + 1) / 3 * math.log(3)
    # Dice (foreground classes): class 1: (2 x 2/3 + 1) / (2 + 1 + 1) = 7/12; class 2 (absent):
    # (0 + 1) / (0 + 1 + 1) = 1/2. Unweighted mean 13/24; weighted (1 x 7/12 + 2 x 1/2) / 3.
    unweighted = math.log(3) + 1 - 13 / 24
    weighted = ce + 1 - (7 / 12 + 1.0) / 3
    np.testing.assert_allclose(losses.dice_ce_loss(labels, logits), [unweighted], rtol=1e-6)
    np.testing.assert_allclose(losses.dice_ce_loss(labels, logits, class_weights=w),
                               [weighted], rtol=1e-6)
    np.testing.assert_allclose(losses.dice_ce_loss(labels, logits, class_weights=[1, 1, 1]),
                               [unweighted], rtol=1e-6)


def test_3d_loss_reduces_over_every_spatial_axis():
    """A volume [N, H, W, D] scores as the same voxels laid out as slices [N, H, W*D]."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2, 4, 3, 5)).astype(np.int32)
    logits = rng.normal(size=(2, 4, 3, 5, 3)).astype(np.float32)
    flat = losses.dice_ce_loss(labels.reshape(2, 4, 15), logits.reshape(2, 4, 15, 3))
    loss = losses.dice_ce_loss(labels, logits)
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss, flat, rtol=1e-6)


def test_streaming_dice_on_3d_sigmoid_logits():
    labels = np.zeros((1, 2, 2, 2), np.int32)
    labels[0, 0] = 1                            # 4 foreground voxels
    logits = np.full((1, 2, 2, 2, 1), -3.0, np.float32)
    logits[0, 0, 0] = 3.0                       # 2 of them predicted, nothing else
    dice = StreamingDice(["background", "lesion"])
    dice.update_state(labels, logits)
    result = dice.result()
    assert float(result["dice_lesion"]) == pytest.approx(2 * 2 / (2 + 4))


def test_head_and_class_weight_validation():
    assert output_channels("sigmoid", 2) == 1 and output_channels("softmax", 4) == 4
    with pytest.raises(ValueError, match="--head=sigmoid"):
        output_channels("sigmoid", 3)
    assert parse_class_weights("1,2.5", 2) == [1.0, 2.5]
    assert parse_class_weights(None, 2) is None and parse_class_weights([], 2) is None
    with pytest.raises(ValueError, match="--class_weights.*>= 0"):
        parse_class_weights("-1,1", 2)
