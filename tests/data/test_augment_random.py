"""The domain-randomising ops (label_intensity, gin) through the augment registry: eagerly and
inside tf.data, XLA chain and jit=False, 2D and 3D; what each op promises (per-region means,
contrast inversion, labels read and untouched, per-sample random networks, moments kept);
their parameters and presets. Tiny tensors: each XLA compilation costs about a second."""
import numpy as np
import pytest
import tensorflow as tf

from uda_tf.data import augment
from uda_tf.data import augment_random as randomize


def _batch(rank=2, n=4, size=12, channels=1, seed=0):
    """Labels: left half 0, right half 1 (plus a block of 2 in the middle); images: the label
    scaled into [0, 1] plus texture."""
    rng = np.random.default_rng(seed)
    shape = (n,) + (size,) * rank
    labels = np.zeros(shape, np.uint8)
    labels[..., size // 2:] = 1
    labels[(slice(None),) + (slice(size // 3, 2 * size // 3),) * rank] = 2
    texture = rng.uniform(0, 0.1, shape + (channels,))
    images = (0.2 + 0.3 * labels[..., None] + texture).astype(np.float32)
    return tf.constant(images), tf.constant(labels)


def _tf_data(aug, *elements):
    return next(iter(tf.data.Dataset.from_tensors(elements).map(aug)))


# NOTE: gin may leave a sample (nearly) as it was: when every layer draws kernel size 1 the
# net is a function of the voxel's intensity alone, which the moment match can turn back into
# the identity (and alpha may draw near 1). Its tests allow a sample of that kind.

# The XLA chain compiles per input signature (seconds each for gin), so each case runs its
# calls on one Augmenter, gin runs a 2-layer net, and the XLA chain runs in tf.data only (where
# the pipeline runs it; eager calls of the compiled chain are tested in test_augment.py).
SMALL = {"gin": dict(gin_layers=2)}


@pytest.mark.parametrize("rank,jit", [(2, True), (2, False), (3, True), (3, False)],
                         ids=["2d-xla", "2d-plain", "3d-xla", "3d-plain"])
@pytest.mark.parametrize("name", ["label_intensity", "gin", "intensity_curve"])
@pytest.mark.slow
def test_ops_eagerly_and_in_tf_data(name, rank, jit):
    tf.random.set_seed(1)
    images, labels = _batch(rank, size=12 if rank == 2 else 6, channels=2)
    aug = augment.build([name], jit=jit, **{f"p_{name}": 1.0}, **SMALL.get(name, {}))
    for in_tf_data in (True,) if jit else (False, True):
        out_x, out_y = _tf_data(aug, images, labels) if in_tf_data else aug(images, labels)
        assert out_x.shape == images.shape and out_x.dtype == tf.float32
        np.testing.assert_array_equal(out_y.numpy(), labels.numpy())  # read, not changed
        assert np.all(np.isfinite(out_x.numpy()))
        difference = np.abs(out_x.numpy() - images.numpy()).reshape(len(images), -1).max(1)
        assert (difference > 1e-4).sum() >= len(images) - (name == "gin")  # (gin: NOTE)
        unlabelled = _tf_data(aug, images) if in_tf_data else aug(images)
        assert unlabelled.shape == images.shape and np.all(np.isfinite(unlabelled.numpy()))
        if name == "label_intensity":  # target images: nothing to read, left unchanged
            np.testing.assert_array_equal(unlabelled.numpy(), images.numpy())


def _region_means(images, labels):
    x, y = images.numpy()[..., 0], labels.numpy()
    return np.array([[x[i][y[i] == k].mean() for k in (0, 1)] for i in range(len(x))])


@pytest.mark.parametrize("jit", [True, False], ids=["xla", "plain"])
def test_label_intensity_gives_each_region_a_random_mean(jit):
    images, labels = _batch(n=16, size=8)
    labels = tf.constant(np.where(labels.numpy() == 2, 1, labels.numpy()))  # two labels
    flat = tf.fill(images.shape, 0.5)  # no texture: each region becomes exactly mu_k
    tf.random.set_seed(2)
    aug = augment.build(["label_intensity"], jit=jit, p_label_intensity=1.0)
    out, _ = aug(flat, labels)
    x, y = out.numpy()[..., 0], labels.numpy()
    means = _region_means(out, labels)
    for i in range(16):
        for k in (0, 1):
            np.testing.assert_allclose(x[i][y[i] == k], means[i, k], atol=1e-6)
    assert np.all((means >= 0) & (means <= 1))
    # Different means per region, per sample; and the contrast ordering is drawn too.
    assert np.all(np.abs(means[:, 0] - means[:, 1]) > 1e-4)
    assert len(np.unique(np.round(means, 4))) == 32
    brighter = means[:, 1] > means[:, 0]
    assert 2 <= brighter.sum() <= 14
    # Textured input: mu_k + s_k (x - m_k) moves each region's mean to mu_k, whose ordering
    # follows the draw and not the input (region 1 is brighter in every input sample).
    out, _ = aug(images, labels)
    textured = _region_means(out, labels)
    assert np.all(_region_means(images, labels)[:, 1] > _region_means(images, labels)[:, 0])
    assert 2 <= (textured[:, 1] > textured[:, 0]).sum() <= 14


def test_label_intensity_follows_the_labels_exactly():
    # A constant image: any structure in the output comes from the labels. The value jumps
    # exactly where the label does, and moving the label boundary moves the jump.
    flat = tf.fill([2, 6, 10, 1], 0.3)
    aug = augment.build(["label_intensity"], p_label_intensity=1.0)
    for boundary in (3, 7):
        labels = np.zeros([2, 6, 10], np.uint8)
        labels[..., boundary:] = 1
        out, _ = aug(flat, tf.constant(labels))
        x = out.numpy()[..., 0]
        steps = np.abs(np.diff(x, axis=2)) > 1e-6
        assert np.all(steps[:, :, boundary - 1]) and steps.sum() == 2 * 6


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_label_intensity_texture_flip_negates_each_regions_texture(flip):
    """label_intensity_texture_flip: the texture (and partial volume) inside a region keeps
    its sign (0) or is mirrored about the region's new mean (1)."""
    images, labels = _batch(n=4, size=12)
    aug = augment.build(["label_intensity"], p_label_intensity=1.0,
                        label_intensity_mean=(-100.0, 100.0), label_intensity_texture=(1.0, 1.0),
                        label_intensity_texture_flip=flip)
    out, _ = aug(images, labels)
    x, y, lab = images.numpy()[..., 0], out.numpy()[..., 0], labels.numpy()
    sign = -1.0 if flip else 1.0
    for i in range(4):
        for k in range(3):
            region = lab[i] == k
            np.testing.assert_allclose(y[i][region] - y[i][region].mean(),
                                       sign * (x[i][region] - x[i][region].mean()), atol=1e-4)
    with pytest.raises(ValueError, match="label_intensity_texture_flip must be a probability"):
        augment.build(["label_intensity"], label_intensity_texture_flip=1.5)


def test_partial_probability_active_and_class_clipping():
    images, labels = _batch(n=32, size=8)
    tf.random.set_seed(3)
    for jit in (True, False):
        out, _ = augment.build(["label_intensity"], jit=jit, p_label_intensity=0.5)(
            images, labels)
        same = [np.allclose(out[i], images[i], atol=1e-6) for i in range(32)]
        assert 4 <= sum(same) <= 28
    # `active`: the samples it leaves out come back as they were
    active = tf.constant([True, False] * 16)
    for op, kwargs in ((randomize.label_intensity, dict(labels=labels)), (randomize.gin, {})):
        out = op(images, active=active, **kwargs).numpy()
        np.testing.assert_allclose(out[1::2], images.numpy()[1::2], atol=1e-6)
        assert (np.abs(out[::2] - images.numpy()[::2]).max((1, 2, 3)) > 1e-4).sum() >= 13
    # labels >= label_intensity_classes share the last class's draw
    flat = tf.fill([4, 4, 6, 1], 0.5)
    labels = np.repeat(np.arange(6, dtype=np.uint8)[None, None], 4, axis=1).repeat(4, axis=0)
    out, _ = augment.build(["label_intensity"], p_label_intensity=1.0,
                           label_intensity_classes=3)(flat, tf.constant(labels))
    x = out.numpy()[..., 0]
    assert np.all(x[..., 3:] == x[..., 2:3]) and np.all(x[..., 1] != x[..., 2])


def test_gin_keeps_moments_and_draws_a_network_per_sample():
    images, labels = _batch(n=6, size=12, channels=2)
    # identical samples: different outputs can only come from different random networks
    same = tf.repeat(images[:1], 6, axis=0)
    tf.random.set_seed(4)
    for jit in (True, False):
        out = augment.build(["gin"], jit=jit, p_gin=1.0, **SMALL["gin"])(same)
        x, ref = out.numpy().reshape(6, -1, 2), same.numpy().reshape(6, -1, 2)
        np.testing.assert_allclose(x.mean(1), ref.mean(1), atol=1e-4)
        np.testing.assert_allclose(x.std(1), ref.std(1), rtol=1e-3)
        assert (np.abs(x - ref).max((1, 2)) > 1e-4).sum() >= 5  # NOTE
        pairs = [np.abs(x[i] - x[j]).max() for i in range(6) for j in range(i)]
        assert min(pairs) > 1e-3  # no two samples share a network
    out = augment.build(["gin"], jit=False, p_gin=0.0)(images, labels)
    np.testing.assert_array_equal(out[0].numpy(), images.numpy())


def test_gin_is_not_a_linear_rescaling():
    # The net's nonlinearity (LeakyReLU) and spatial mixing: the output is not a*x + b.
    images, _ = _batch(n=8, size=12)
    tf.random.set_seed(5)
    out = augment.build(["gin"], jit=False, p_gin=1.0)(images).numpy().reshape(8, -1)
    x = images.numpy().reshape(8, -1)
    residual = []
    for i in range(8):
        a, b = np.polyfit(x[i], out[i], 1)
        residual.append(np.abs(out[i] - (a * x[i] + b)).max())
    assert max(residual) > 1e-2


@pytest.mark.slow
def test_intensity_curve_is_a_smooth_random_function_of_intensity_that_may_invert():
    rng = np.random.default_rng(0)
    u = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))  # one ramp per sample
    images = tf.constant((0.2 + 0.5 * u)[..., None, None] * np.ones((1, 1, 3, 1), np.float32))
    images = images + tf.constant(rng.uniform(0, 1e-3, images.shape).astype(np.float32))
    out = randomize.intensity_curve(images, seed=3).numpy()
    x = images.numpy()
    # inside each sample's own range, and a function of the intensity alone
    assert np.all(out >= x.min(axis=(1, 2), keepdims=True) - 1e-6)
    assert np.all(out <= x.max(axis=(1, 2), keepdims=True) + 1e-6)
    np.testing.assert_allclose(out[:, :, 0], out[:, :, 2], atol=5e-3)
    # contrast kept on some samples, inverted on others
    corr = [np.corrcoef(x[i].ravel(), out[i].ravel())[0, 1] for i in range(len(x))]
    assert min(corr) < -0.5 and max(corr) > 0.5
    # inactive samples: the identity curve
    active = tf.constant([True, False] * 32)
    kept = randomize.intensity_curve(images, seed=3, active=active).numpy()
    np.testing.assert_allclose(kept[1::2], x[1::2], atol=1e-5)
    assert np.abs(kept[0::2] - x[0::2]).max() > 0.05


def test_presets_and_names():
    full = augment.PRESETS["full"]
    assert set(augment.resolve_names("randomized")) == set(full) | {"label_intensity"}
    assert set(augment.resolve_names("full_gin")) == set(full) | {"gin"}
    assert set(augment.resolve_names("full_curve")) == set(full) | {"intensity_curve"}
    assert augment.resolve_names("gin") == ("gin",)  # the op, not a preset
    order = augment.resolve_names("noise,bias_field,blur,gin,label_intensity,flip")
    assert order == ("flip", "label_intensity", "gin", "noise", "blur", "bias_field")
    # The whole chains with jit=False (each op under XLA: test_ops_eagerly_and_in_tf_data; the
    # full chain under XLA: test_augment.py's test_full_preset_in_tf_data).
    images, labels = _batch(n=4, size=16)
    for preset, jit_labelled, jit_unlabelled in (("randomized", False, False),
                                                 ("full_gin", False, False)):
        kwargs = dict(p_gin=1.0, p_label_intensity=1.0, **SMALL["gin"])
        aug = augment.build(preset, jit=jit_labelled, **kwargs)
        x, y = _tf_data(aug, images, labels)
        assert x.shape == images.shape and np.all(np.isfinite(x.numpy()))
        assert set(np.unique(y.numpy())) <= {0, 1, 2}
        x = _tf_data(augment.build(preset, jit=jit_unlabelled, **kwargs), images)
        assert x.shape == images.shape and np.all(np.isfinite(x.numpy()))


def test_parameters_parse_and_bad_values_name_the_parameter():
    params = augment.parse_params(["label_intensity_mean=0.1:0.9", "label_intensity_classes=4",
                                   "label_intensity_texture=0:2", "gin_layers=3",
                                   "gin_channels=8", "gin_kernel=5", "p_gin=1",
                                   "p_label_intensity=0.25"])
    assert params == {"label_intensity_mean": (0.1, 0.9), "label_intensity_classes": 4,
                      "label_intensity_texture": (0.0, 2.0), "gin_layers": 3,
                      "gin_channels": 8, "gin_kernel": 5, "p_gin": 1.0,
                      "p_label_intensity": 0.25}
    aug = augment.build("gin,label_intensity", jit=False, **params)
    images, labels = _batch(n=2, size=12)
    assert aug(images, labels)[0].shape == images.shape
    with pytest.raises(ValueError, match=r"--augment_params: gin_layers='2.5' must be one integ"):
        augment.parse_params(["gin_layers=2.5"])
    with pytest.raises(ValueError, match=r"label_intensity_mean='0.5' must be low:high"):
        augment.parse_params(["label_intensity_mean=0.5"])
    bad = {"gin_kernel": 2, "gin_layers": 0, "gin_channels": 0, "label_intensity_classes": 0,
           "label_intensity_mean": (1.0, 0.0), "label_intensity_texture": (-1.0, 1.0),
           "curve_values": (0.5, 1.5)}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key):
            augment.build("none", **{key: value})  # what the flag check builds
    with pytest.raises(ValueError, match="p_gin must be a probability"):
        augment.build("gin", p_gin=1.5)
