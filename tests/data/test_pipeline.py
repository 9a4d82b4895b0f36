"""tf.data pipelines: shapes, batch composition, no target labels in training data, and the
augmentation ops behaving the same eagerly and inside tf.data."""
import numpy as np
import tensorflow as tf

from uda_tf.data import augment, pipeline


def test_train_dataset_zips_source_pairs_with_target_images_only(tiny_prepared):
    data_dir, manifest = tiny_prepared
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", target="dom_b",
                                global_batch_size=6, shuffle_buffer=16, seed=0)
    (x_s, y_s), x_t = next(iter(ds))
    assert x_s.shape == (6, 16, 24, 1) and x_s.dtype == tf.float32
    assert y_s.shape == (6, 16, 24) and y_s.dtype == tf.uint8
    assert x_t.shape == (6, 16, 24, 1)  # a tensor, not a (image, label) pair
    assert set(np.unique(y_s.numpy())) <= {0, 1, 2}


def test_source_only_dataset_has_no_target(tiny_prepared):
    data_dir, manifest = tiny_prepared
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", global_batch_size=4,
                                shuffle_buffer=8, augment_data=False)
    x, y = next(iter(ds))
    assert x.shape == (4, 16, 24, 1) and y.shape == (4, 16, 24)


def test_eval_dataset_is_one_ordered_pass(tiny_prepared):
    data_dir, manifest = tiny_prepared
    n = pipeline.num_records(manifest, "dom_b", "test")
    ds = pipeline.eval_dataset(data_dir, manifest, "dom_b", "test", batch_size=4,
                               with_metadata=True)
    indices = np.concatenate([b["slice_index"].numpy() for b in ds])
    assert len(indices) == n > 0
    case = manifest["domains"]["dom_b"]["cases"]["test"][0]
    assert list(indices) == list(range(manifest["cases"][case]["num_slices"]))


def test_flip_keeps_image_and_label_aligned_eagerly_and_in_tf_data():
    images = tf.reshape(tf.range(2 * 4 * 4, dtype=tf.float32), [2, 4, 4, 1])
    labels = tf.cast(tf.reshape(tf.range(2 * 4 * 4), [2, 4, 4]), tf.int32)

    def check(x, y):
        np.testing.assert_array_equal(x[..., 0].numpy(), tf.cast(y, tf.float32).numpy())

    tf.random.set_seed(1)
    check(*augment.random_flip(images, labels, axis=1))
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(8).map(
        lambda x, y: augment.random_flip(x, y, axis=2))
    flipped = 0
    for x, y in ds:
        check(x, y)
        flipped += int(not np.array_equal(x.numpy(), images.numpy()))
    assert 0 < flipped < 8  # random per call, not always or never


def test_intensity_jitter_bounds_eagerly_and_in_tf_data():
    images = tf.ones([64, 2, 2, 1])
    eager = augment.intensity_jitter(images, scale=0.1, shift=0.05)
    graph = next(iter(tf.data.Dataset.from_tensors(images).map(
        lambda x: augment.intensity_jitter(x, scale=0.1, shift=0.05))))
    for out in (eager.numpy(), graph.numpy()):
        assert out.min() >= 0.85 - 1e-6 and out.max() <= 1.15 + 1e-6
        assert np.ptp(out[:, 0, 0, 0]) > 0.05  # samples differ
        assert np.all(out == out[:, :1, :1, :])  # one gain/offset per sample
