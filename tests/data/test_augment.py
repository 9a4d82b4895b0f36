"""Every augmentation op, eagerly and inside tf.data (the two can differ), 2D and 3D: shapes and
dtypes kept, labels aligned under spatial ops and untouched by intensity ops, per-sample
randomness, probabilities; FDA; the registry's errors.

The op tests run the default XLA-compiled chain; the probability tests run jit=False, the
plain-TF path that computes expensive ops on the chosen samples only. (Each XLA compilation
costs about a second, so 3D runs inside tf.data only.)"""
import numpy as np
import pytest
import tensorflow as tf

from uda_tf.data import augment
from uda_tf.data.augment_intensity import fda

SPATIAL = [n for n, op in augment.OPS.items() if op.kind == "spatial"]
# The randomised ops (label_intensity, gin) have these checks, in every mode, and their own
# per-sample tests in tests/data/test_augment_random.py.
INTENSITY = [n for n, op in augment.OPS.items() if op.kind == "intensity"
             and n not in ("label_intensity", "gin")]


def _batch(rank=2, n=6, size=24, seed=0):
    """Labels: blocks of 0/1/2; images: the label value plus a constant, so a spatial op that
    keeps them aligned gives round(image - 10) == label away from boundaries."""
    rng = np.random.default_rng(seed)
    shape = (n,) + (size,) * rank
    labels = np.zeros(shape, np.uint8)
    for i in range(n):
        corner = rng.integers(2, size // 2, rank)
        box = tuple(slice(c, c + size // 3) for c in corner)
        labels[(i,) + box] = 1 + i % 2
        inner = tuple(slice(c + 2, c + size // 3 - 2) for c in corner)
        labels[(i,) + inner] = 2 - i % 2
    images = (labels.astype(np.float32) + 10.0)[..., None]
    return tf.constant(images), tf.constant(labels)


def _run(aug, images, labels, in_tf_data):
    if not in_tf_data:
        return aug(images, labels)
    ds = tf.data.Dataset.from_tensors((images, labels)).map(aug)
    return next(iter(ds))


def _check_alignment(images, labels):
    x = images.numpy()[..., 0]
    y = labels.numpy()
    assert set(np.unique(y)) <= {0, 1, 2}  # nearest neighbour: no new label values
    exact = np.isclose(x, np.round(x), atol=1e-3)  # away from interpolated boundaries
    agree = (np.round(x[exact]) - 10 == y[exact]) | (np.round(x[exact]) <= 10) & (y[exact] == 0)
    assert agree.mean() > 0.97
    assert exact.mean() > 0.6


MODES = [(2, False), (2, True), (3, True)]
MODE_IDS = ["2d-eager", "2d-tf_data", "3d-tf_data"]


@pytest.mark.parametrize("rank,in_tf_data", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_ops_keep_labels_aligned(name, rank, in_tf_data):
    tf.random.set_seed(3)
    images, labels = _batch(rank, size=24 if rank == 2 else 16)
    aug = augment.build([name], **{f"p_{name}": 1.0})
    out_x, out_y = _run(aug, images, labels, in_tf_data)
    assert out_x.shape == images.shape and out_x.dtype == tf.float32
    assert out_y.shape == labels.shape and out_y.dtype == tf.uint8
    _check_alignment(out_x, out_y)
    changed = [not np.allclose(out_x[i], images[i]) for i in range(len(labels))]
    assert sum(changed) >= len(changed) - 1  # every sample is drawn at p = 1
    if name == "flip":  # a flip is exact: each sample equals one of its flips of the input
        for i in range(len(labels)):
            candidates = [labels[i].numpy()]
            for axis in range(rank):
                candidates += [np.flip(c, axis) for c in candidates]
            assert any(np.array_equal(out_y[i], c) for c in candidates)


@pytest.mark.parametrize("rank,in_tf_data", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_ops_change_images_only(name, rank, in_tf_data):
    tf.random.set_seed(4)
    images, labels = _batch(rank, n=8, size=16 if rank == 2 else 10)
    images = images + tf.random.uniform(images.shape, 0, 0.5, seed=1)  # some texture
    aug = augment.build([name], **{f"p_{name}": 1.0})
    out_x, out_y = _run(aug, images, labels, in_tf_data)
    np.testing.assert_array_equal(out_y.numpy(), labels.numpy())
    assert out_x.shape == images.shape and np.all(np.isfinite(out_x.numpy()))
    difference = np.abs(out_x.numpy() - images.numpy()).reshape(len(images), -1).max(1)
    assert (difference > 1e-4).sum() >= len(images) - 1  # (noise std may draw ~0 once)
    per_sample = [float(np.linalg.norm(out_x[i] - images[i])) for i in range(len(images))]
    assert np.ptp(per_sample) > 1e-3  # one draw per sample, not one per batch


@pytest.mark.parametrize("name", list(augment.OPS))
def test_probability_zero_is_identity_and_half_mixes(name):
    images, labels = _batch(2, n=32, size=12)
    images = images + tf.random.uniform(images.shape, 0, 0.5, seed=2)
    out_x, out_y = augment.build([name], jit=False, **{f"p_{name}": 0.0})(images, labels)
    np.testing.assert_array_equal(out_x.numpy(), images.numpy())
    np.testing.assert_array_equal(out_y.numpy(), labels.numpy())
    if name == "jitter":
        return
    tf.random.set_seed(5)
    aug = augment.build([name], jit=False, **{f"p_{name}": 0.5})
    out_x = aug(images)  # unlabelled: images only
    same = [np.allclose(out_x[i], images[i]) for i in range(32)]
    if augment.OPS[name].needs_labels:  # an op that reads labels skips an unlabelled batch
        assert sum(same) == 32
        out_x, _ = aug(images, labels)
        same = [np.allclose(out_x[i], images[i]) for i in range(32)]
    assert 2 <= sum(same) <= 30
    ds = tf.data.Dataset.from_tensors((images, labels)).map(aug)
    out_x, out_y = next(iter(ds))
    assert 2 <= sum(np.allclose(out_x[i], images[i]) for i in range(32)) <= 30


def test_xla_chain_mixes_samples_too():
    images, _ = _batch(2, n=32, size=12)
    images = images + tf.random.uniform(images.shape, 0, 0.5, seed=2)
    tf.random.set_seed(6)
    out = augment.build(["gamma", "blur"], p_gamma=0.5, p_blur=0.0)(images)
    same = [np.allclose(out[i], images[i], atol=1e-5) for i in range(32)]
    assert 2 <= sum(same) <= 30  # identity parameters for the samples not chosen


@pytest.mark.parametrize("jit,ranks", [(True, (2,)), (False, (2, 3))], ids=["xla", "plain"])
@pytest.mark.slow
def test_full_preset_in_tf_data(jit, ranks):
    # (3D under XLA runs in test_pipeline's 3D patch stream; each compilation costs seconds)
    aug = augment.build("full", rotation_degrees=10, p_elastic=0.5, jit=jit)
    for rank in ranks:
        images, labels = _batch(rank, n=4, size=16)
        ds = tf.data.Dataset.from_tensors((images, labels)).repeat(3).map(aug)
        for x, y in ds:
            assert x.shape == images.shape and y.shape == labels.shape
            assert set(np.unique(y.numpy())) <= {0, 1, 2}
        ds = tf.data.Dataset.from_tensors(images).map(aug)  # unlabelled
        assert next(iter(ds)).shape == images.shape


def test_build_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown augmentations \['warp'\].*flip"):
        augment.build(["flip", "warp"])
    with pytest.raises(ValueError, match=r"unknown augmentation parameters \['rotation_deg'\]"):
        augment.build("full", rotation_deg=5)
    with pytest.raises(ValueError, match="p_noise must be a probability"):
        augment.build("full", p_noise=2)
    assert augment.resolve_names("noise,flip") == ("flip", "noise")  # registry order
    assert augment.resolve_names("default") == ("flip", "jitter")


def test_fda_swaps_low_frequency_amplitude_only():
    rng = np.random.default_rng(0)
    source = tf.constant(rng.random((2, 32, 32, 1)), tf.float32)
    target = tf.constant(5 + 3 * rng.random((2, 32, 32, 1)), tf.float32)
    out = fda(source, target, beta=0.1)
    spectrum = lambda x: np.fft.fft2(x.numpy()[..., 0])  # noqa: E731
    amp_out, amp_src, amp_tgt = (np.abs(spectrum(x)) for x in (out, source, target))
    half = 3  # floor(0.1 * 32)
    low = np.zeros((32, 32), bool)
    idx = np.minimum(np.arange(32), 32 - np.arange(32)) <= half
    low[np.ix_(idx, idx)] = True
    np.testing.assert_allclose(amp_out[:, low], amp_tgt[:, low], rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(amp_out[:, ~low], amp_src[:, ~low], rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(out.numpy().mean((1, 2, 3)), target.numpy().mean((1, 2, 3)),
                               rtol=1e-4)  # the DC term is the mean
    ds = tf.data.Dataset.from_tensors((source, target)).map(lambda s, t: fda(s, t, beta=0.1))
    np.testing.assert_allclose(next(iter(ds)).numpy(), out.numpy(), atol=1e-5)


@pytest.mark.parametrize("jit", [True, False], ids=["xla", "plain"])
@pytest.mark.parametrize("p_rotation", [0.0, 1.0], ids=["mirror_only", "through_resampling"])
def test_flips_folded_into_resampling_are_exact(jit, p_rotation):
    # rotation_degrees=0: a chosen sample goes through the resampling pass with the identity
    # rotation, so only the folded mirroring moves it; values must survive bit for bit.
    images, labels = _batch(2, n=4, size=12)
    images = images + tf.random.uniform(images.shape, 0, 0.5, seed=7)
    aug = augment.build(["flip", "rotation"], jit=jit, p_flip=1.0, p_rotation=p_rotation,
                        rotation_degrees=0.0)
    for out_x, out_y in (aug(images, labels),
                         next(iter(tf.data.Dataset.from_tensors((images, labels)).map(aug)))):
        np.testing.assert_array_equal(out_x.numpy(), images.numpy()[:, ::-1, ::-1])
        np.testing.assert_array_equal(out_y.numpy(), labels.numpy()[:, ::-1, ::-1])


def test_noise_bank_gives_independent_unit_gaussian_fields():
    tf.random.set_seed(3)  # the windows drawn: fixed, so the test does not depend on the order
    zeros = tf.zeros([16, 32, 32, 1])
    aug = augment.build(["noise"], p_noise=1.0, noise_std=(1.0, 1.0))
    for out in (aug(zeros), next(iter(tf.data.Dataset.from_tensors(zeros).map(aug)))):
        x = out.numpy().reshape(16, -1)
        assert np.all(np.abs(x.mean(1)) < 0.15) and np.all(np.abs(x.std(1) - 1) < 0.1)
        # neighbouring voxels uncorrelated; samples not copies of each other
        assert abs(np.corrcoef(out.numpy()[:, :, :-1].ravel(),
                               out.numpy()[:, :, 1:].ravel())[0, 1]) < 0.05
        # two of 16 samples may draw the same window of the bank (480 starts x 2 signs; the
        # noise op's docstring allows it), not most of them
        assert len({np.round(row[:8], 5).tobytes() for row in x}) >= 14


def test_parse_params_types_values_and_names_the_flag():
    params = augment.parse_params(["rotation_degrees=10", "p_noise=0.5", "noise_std=0:0.05",
                                   "elastic_grid=4", "flip_axes=2"])
    assert params == {"rotation_degrees": 10.0, "p_noise": 0.5, "noise_std": (0.0, 0.05),
                      "elastic_grid": 4, "flip_axes": (2,)}
    assert isinstance(params["elastic_grid"], int)
    augment.build("full", **params)  # accepted as is
    with pytest.raises(ValueError, match=r"--augment_params: 'warp=1' must be name=value"):
        augment.parse_params(["warp=1"])
    with pytest.raises(ValueError, match=r"--x: noise_std='0.1' must be low:high"):
        augment.parse_params(["noise_std=0.1"], flag="x")
    assert augment.resolve_names("flip") == ("flip",)
