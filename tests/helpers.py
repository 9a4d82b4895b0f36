"""Small builders shared by the tests (tiny models, fixed data)."""
import numpy as np

CLASS_NAMES = ["background", "a", "b"]
SHAPE = (16, 16, 1)


def tiny_segmentor(norm="instance", sync=False, seed=0):
    import keras
    from uda_tf.models.unet import residual_unet_2d
    keras.utils.set_random_seed(seed)
    return residual_unet_2d(SHAPE, len(CLASS_NAMES), base_filters=4, depth=3, norm=norm,
                            sync_batchnorm=sync)


def tiny_batch(n=4, seed=0):
    """Source images with labels that depend on intensity, and brighter target images."""
    rng = np.random.default_rng(seed)
    x_s = rng.random((n, *SHAPE), dtype=np.float32)
    y_s = np.digitize(x_s[..., 0], [0.4, 0.7]).astype(np.uint8)
    x_t = (0.5 + 0.5 * rng.random((n, *SHAPE))).astype(np.float32)
    return x_s, y_s, x_t
