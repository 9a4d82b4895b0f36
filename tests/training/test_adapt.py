"""Fine-tuning from a checkpoint with frozen layers, and AdaBN's statistics re-estimation."""
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf.training import adapt


def _one_source_step(segmentor):
    from uda_tf.methods.source_only import SourceOnly
    model = SourceOnly(segmentor, CLASS_NAMES)
    model.compile(seg=keras.optimizers.SGD(0.5))
    model.build_optimizers()
    x_s, y_s, _ = tiny_batch(4)
    model.fit(tf.data.Dataset.from_tensors((x_s, y_s)), epochs=1, verbose=0)


def test_frozen_layers_keep_their_weights_and_the_rest_train():
    seg = tiny_segmentor()
    frozen = adapt.freeze_layers(seg, "enc0|bottleneck")
    assert frozen and all(n.startswith(("enc0", "bottleneck")) for n in frozen)
    assert "enc1_conv1" not in frozen and "logits" not in frozen
    before = {w.path: w.numpy().copy() for w in seg.weights}
    _one_source_step(seg)
    for layer in seg.layers:
        for w in layer.trainable_weights if layer.trainable else layer.weights:
            moved = not np.array_equal(before[w.path], w.numpy())
            if layer.name in frozen:
                assert not moved, w.path
    moved_names = {w.path for w in seg.trainable_weights
                   if not np.array_equal(before[w.path], w.numpy())}
    assert any("logits" in p for p in moved_names) and any("enc1" in p for p in moved_names)


@pytest.mark.parametrize("pattern,message", [
    ("nothing_here", "matches no layer with weights; the segmentor's are: enc0_conv1"),
    ("enc[", "is not a regular expression"),
])
def test_freeze_pattern_errors_name_the_flag(pattern, message):
    with pytest.raises(ValueError, match="--freeze_layers") as err:
        adapt.freeze_layers(tiny_segmentor(), pattern)
    assert message in str(err.value)


def test_init_checkpoint_loads_and_rejects_what_does_not_fit(tmp_path):
    source = tiny_segmentor(seed=1)
    path = str(tmp_path / "best.weights.h5")
    source.save_weights(path)
    target = tiny_segmentor(seed=2)
    adapt.load_init_checkpoint(target, path)
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    from uda_tf.models.unet import residual_unet_2d
    wider = residual_unet_2d((16, 16, 1), 3, base_filters=8, depth=3)
    with pytest.raises(ValueError, match="--init_checkpoint=.*does not fit this segmentor"):
        adapt.load_init_checkpoint(wider, path)
    with pytest.raises(FileNotFoundError, match="--init_checkpoint=.*no such file"):
        adapt.load_init_checkpoint(target, str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match="ending in .weights.h5"):
        adapt.load_init_checkpoint(target, str(tmp_path / "model.keras"))


def test_adabn_sets_the_average_target_batch_statistics():
    seg = tiny_segmentor(norm="batch")
    rng = np.random.default_rng(3)
    # three target batches with different offsets, so a plain momentum update would not
    # land on their average
    batches = [(rng.random((4, 16, 16, 1)) + k).astype(np.float32) for k in range(3)]
    conv = keras.Model(seg.input, seg.get_layer("enc0_conv1").output)  # enc0_norm1's input
    acts = [conv(b, training=True).numpy() for b in batches]
    expected_mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], axis=0)
    expected_var = np.mean([a.var(axis=(0, 1, 2)) for a in acts], axis=0)

    used = adapt.reestimate_batchnorm(seg, iter(batches + batches), max_batches=3)
    assert used == 3
    norm = seg.get_layer("enc0_norm1")
    np.testing.assert_allclose(norm.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.moving_variance.numpy(), expected_var, rtol=1e-4, atol=1e-6)
    assert all(layer.momentum == 0.99 for layer in adapt.batchnorm_layers(seg))
    # the weights themselves do not move
    for layer in seg.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert layer.trainable


def test_adabn_needs_batchnorm_and_target_images():
    with pytest.raises(ValueError, match="--norm=batch"):
        adapt.reestimate_batchnorm(tiny_segmentor(norm="instance"), [np.zeros((1, 16, 16, 1))], 1)
    with pytest.raises(ValueError, match="no training images"):
        adapt.reestimate_batchnorm(tiny_segmentor(norm="batch"), [], 5)

    from absl import app
    from uda_tf.cli.train import check_adaptation_flags
    with pytest.raises(app.UsageError, match="--adabn needs --target_domain"):
        check_adaptation_flags(SimpleNamespace(adabn=True, target_domain=None, norm="batch"))
    with pytest.raises(app.UsageError, match="--norm=instance has none"):
        check_adaptation_flags(SimpleNamespace(adabn=True, target_domain="b", norm="instance"))
    check_adaptation_flags(SimpleNamespace(adabn=False, target_domain=None, norm="instance"))
