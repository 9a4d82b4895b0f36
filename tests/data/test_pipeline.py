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
    n = manifest.num_records("dom_b", "test")
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


# -- options of the issue-3 data layer --------------------------------------------------------
import pytest  # noqa: E402

from tests.helpers import make_msd  # noqa: E402
from uda_tf.data import tfrecord  # noqa: E402
from uda_tf.data.prepare import prepare  # noqa: E402


@pytest.fixture(scope="module")
def raw_msd(tmp_path_factory):
    return make_msd(tmp_path_factory.mktemp("raw_pipeline"))


@pytest.fixture(scope="module")
def prepared_25d(raw_msd, tmp_path_factory):
    """float16, GZIP-compressed, 2.5D (3 channels) slices."""
    out = tmp_path_factory.mktemp("p25d")
    manifest = prepare(str(raw_msd), str(out), size=(16, 24), records_per_shard=8, workers=1,
                       context_slices=1, image_dtype="float16", compression="gzip",
                       verbose=False)
    return str(out), manifest


@pytest.fixture(scope="module")
def prepared_3d(raw_msd, tmp_path_factory):
    out = tmp_path_factory.mktemp("p3d")
    manifest = prepare(str(raw_msd), str(out), size=(16, 24), output="volumes",
                       records_per_shard=1, workers=1, verbose=False)
    return str(out), manifest


def test_training_datasets_shard_by_file(tiny_prepared):
    data_dir, manifest = tiny_prepared
    policy = tf.data.experimental.AutoShardPolicy.FILE
    for target in (None, "dom_b"):
        ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", target=target,
                                    global_batch_size=4, shuffle_buffer=8)
        assert ds.options().experimental_distribute.auto_shard_policy == policy


def test_float16_gzip_context_slices(prepared_25d):
    data_dir, manifest = prepared_25d
    assert manifest["image_shape"] == [16, 24, 3] and manifest["image_dtype"] == "float16"
    assert manifest["output"]["compression"] == "GZIP"
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", target="dom_b",
                                global_batch_size=4, shuffle_buffer=8,
                                augmentations="flip,gamma,noise", fda_beta=0.05)
    (x_s, y_s), x_t = next(iter(ds))
    assert x_s.shape == (4, 16, 24, 3) and x_t.shape == (4, 16, 24, 3) and y_s.shape == (4, 16, 24)
    batches = list(pipeline.eval_dataset(data_dir, manifest, "dom_a", "test", batch_size=64,
                                         with_metadata=True))
    image = batches[0]["image"].numpy()
    k = batches[0]["slice_index"].numpy()
    # channel 1 is the slice itself, 0 and 2 its neighbours (edges repeated)
    np.testing.assert_array_equal(image[1:, ..., 0], image[:-1, ..., 1])
    np.testing.assert_array_equal(image[0, ..., 0], image[0, ..., 1])
    assert list(k) == list(range(len(k)))
    # the single-record parser tells float16 from float32 by itself
    files = manifest.shard_files(data_dir, "dom_a", "test")
    record = next(iter(tf.data.TFRecordDataset(files, compression_type="GZIP")))
    np.testing.assert_array_equal(tfrecord.parse_slice(record, 16, 24, 3)["image"].numpy(),
                                  image[0])


@pytest.mark.slow
def test_3d_patches_with_foreground_oversampling(prepared_3d):
    data_dir, manifest = prepared_3d
    assert manifest["image_shape"] == [16, 24, None, 1]
    with pytest.raises(ValueError, match="patch_size"):
        pipeline.train_dataset(data_dir, manifest, source="dom_a", global_batch_size=2)
    tf.random.set_seed(0)
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", target="dom_b",
                                global_batch_size=3, shuffle_buffer=2, patch_size=(8, 8, 4),
                                foreground_fraction=1.0, patches_per_volume=2,
                                augmentations="full")
    for (x_s, y_s), x_t in ds.take(4):
        assert x_s.shape == (3, 8, 8, 4, 1) and y_s.shape == (3, 8, 8, 4)
        assert x_t.shape == (3, 8, 8, 4, 1)
        assert all(y_s[i].numpy().max() > 0 for i in range(3))  # every patch has foreground
    # patches larger than the volume are padded with its background value
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", global_batch_size=1,
                                shuffle_buffer=2, patch_size=(20, 24, 16), augment_data=False)
    x, y = next(iter(ds))
    assert x.shape == (1, 20, 24, 16, 1) and float(tf.reduce_min(x)) >= 0.0
    volumes = list(pipeline.eval_dataset(data_dir, manifest, "dom_b", "test", batch_size=1,
                                         with_metadata=True))
    case = manifest["domains"]["dom_b"]["cases"]["test"][0]
    assert volumes[0]["case_id"].numpy()[0].decode() == case
    assert volumes[0]["image"].shape[1:4] == tuple(manifest["cases"][case]["prepared_shape"])


def test_target_stream_has_its_own_augmentation(tiny_prepared):
    data_dir, manifest = tiny_prepared
    stored = np.concatenate([x.numpy().ravel() for x, _ in pipeline.eval_dataset(
        data_dir, manifest, "dom_b", "train", batch_size=64)])
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_a", target="dom_b",
                                global_batch_size=4, shuffle_buffer=8, augmentations="gamma",
                                augment_params={"p_gamma": 1.0}, target_augmentations="flip")
    (x_s, _), x_t = next(iter(ds))
    assert np.isin(x_t.numpy().ravel(), stored).all()  # flips only move stored values
    ds = pipeline.train_dataset(data_dir, manifest, source="dom_b", global_batch_size=4,
                                shuffle_buffer=8, augmentations="gamma",
                                augment_params={"p_gamma": 1.0})
    x, _ = next(iter(ds))
    assert not np.isin(x.numpy().ravel(), stored).all()  # gamma changes them
