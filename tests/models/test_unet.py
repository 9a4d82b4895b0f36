import numpy as np
import pytest

from tests.helpers import tiny_segmentor
from uda_tf.models.unet import residual_unet_2d


def test_unet_outputs_logits_and_bottleneck_features():
    model = tiny_segmentor(depth=3)
    out = model(np.zeros((2, 16, 16, 1), np.float32))
    assert out["logits"].shape == (2, 16, 16, 3)
    assert out["features"].shape == (2, 2, 2, 32)  # 16 / 2**3, 4 * 2**3 channels


def test_unet_rejects_size_not_divisible_by_downsampling():
    with pytest.raises(ValueError, match="divisible by 8"):
        residual_unet_2d((20, 16, 1), 3, depth=3)
