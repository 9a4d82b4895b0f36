"""3D validation patches: tiles cover the volume exactly once, padding is background."""
import numpy as np
import tensorflow as tf

from uda_tf.data.pipeline import tile_volume


def test_tiles_cover_the_volume_once_and_pad_with_background():
    rng = np.random.default_rng(0)
    image = rng.random((5, 4, 3, 2)).astype(np.float32)
    label = rng.integers(1, 3, (5, 4, 3)).astype(np.uint8)
    patches, labels = tile_volume(tf.constant(image), tf.constant(label), (2, 4, 2), -1.0)
    assert patches.shape == (3 * 1 * 2, 2, 4, 2, 2) and labels.shape == (6, 2, 4, 2)
    # reassemble: tile (i, j, k) in C order holds the block starting at (2i, 4j, 2k)
    whole = np.full((6, 4, 4, 2), np.nan, np.float32)
    whole_label = np.full((6, 4, 4), 99, np.int64)
    for n, (i, j, k) in enumerate(np.ndindex(3, 1, 2)):
        whole[2 * i:2 * i + 2, 4 * j:4 * j + 4, 2 * k:2 * k + 2] = patches[n]
        whole_label[2 * i:2 * i + 2, 4 * j:4 * j + 4, 2 * k:2 * k + 2] = labels[n]
    np.testing.assert_array_equal(whole[:5, :, :3], image)
    np.testing.assert_array_equal(whole_label[:5, :, :3], label)
    assert (whole[5] == -1).all() and (whole[:, :, 3] == -1).all()
    assert (whole_label[5] == 0).all() and (whole_label[:, :, 3] == 0).all()
