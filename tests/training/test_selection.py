"""Model selection without target labels: entropy and agreement criteria, the oracle kept apart,
and the checkpoint following the chosen monitor."""
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import tiny_batch, tiny_segmentor
from uda_tf.training.selection import (TargetCriteria, selection_callbacks,
                                       selection_monitor)

SHAPE = (16, 16, 1)


def threshold_segmentor(weight=2.0, ramp=False):
    """logits (0, w (x - 0.5)) per pixel: foreground where x > 0.5 when w > 0, confident in
    proportion to |w|. `ramp` subtracts a fixed gradient along H, so the model is not
    left-right symmetric."""
    import keras
    inputs = keras.Input(SHAPE)
    x = inputs
    if ramp:
        gradient = np.linspace(-0.4, 0.4, SHAPE[0], dtype=np.float32)[None, :, None, None]
        x = keras.layers.Lambda(lambda t: t - gradient)(x)
    conv = keras.layers.Conv2D(2, 1, name="head")
    model = keras.Model(inputs, {"logits": conv(x)})
    set_weight(model, weight)
    return model


def set_weight(model, weight):
    model.get_layer("head").set_weights([np.array([[[[0.0, weight]]]], np.float32),
                                         np.array([0.0, -weight / 2], np.float32)])


def target_data(n=6, seed=0):
    x = np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)
    return x, (x[..., 0] > 0.5).astype(np.uint8)


def batches(with_labels=True):
    x, y = target_data()
    return lambda: tf.data.Dataset.from_tensor_slices((x, y) if with_labels else x).batch(4)


def test_selection_monitor():
    assert selection_monitor("source_dice") == ("val_dice", "max")
    assert selection_monitor("target_entropy") == ("target_entropy", "min")
    assert selection_monitor("target_agreement") == ("target_agreement", "max")
    assert selection_monitor("oracle") == ("oracle/val_dice", "max")
    with pytest.raises(ValueError, match="--select_on"):
        selection_monitor("target_dice")
    with pytest.raises(ValueError, match="target validation"):
        selection_callbacks("target_entropy", "/tmp/x.weights.h5")


def test_entropy_is_lower_for_a_more_confident_model():
    import keras
    segmentor = tiny_segmentor()
    confident = keras.Model(segmentor.input, {"logits": 5.0 * segmentor.output["logits"]})
    x, _, _ = tiny_batch(6)
    criteria = TargetCriteria(lambda: [x[:4], x[4:]], oracle=False)
    base, sharp = criteria.compute(segmentor), criteria.compute(confident)
    assert 0 < sharp["target_entropy"] < base["target_entropy"] <= 1
    assert sharp["target_agreement"] == base["target_agreement"]  # same argmax
    assert "oracle/val_dice" not in base


def test_agreement_under_flips_and_jitter():
    symmetric = TargetCriteria(batches(False), oracle=False).compute(threshold_segmentor())
    assert symmetric["target_agreement"] == 1.0  # a pixelwise model commutes with flips
    ramp = threshold_segmentor(ramp=True)
    assert TargetCriteria(batches(False), flip_axes=(2,)).compute(ramp)[
        "target_agreement"] == 1.0  # the ramp runs along H only
    assert TargetCriteria(batches(False), flip_axes=(1,)).compute(ramp)[
        "target_agreement"] < 0.95
    jitter = TargetCriteria(batches(False), transforms=("jitter",), jitter_shift=0.1)
    assert 0.5 < jitter.compute(threshold_segmentor())["target_agreement"] < 0.99


@pytest.mark.parametrize("select_on,best_epoch", [
    ("target_entropy", 1), ("oracle", 0), ("source_dice", 2), ("target_agreement", 0)])
def test_checkpoint_follows_the_chosen_monitor(tmp_path, select_on, best_epoch):
    """Epoch 0: right, unsure; 1: wrong, very sure; 2: right, fairly sure. The oracle Dice is
    in every epoch's logs, but only select_on=oracle lets it choose."""
    from uda_tf.methods import SourceOnly
    segmentor = threshold_segmentor()
    model = SourceOnly(segmentor, ["background", "fg"])
    path = str(tmp_path / "best.weights.h5")
    callbacks = selection_callbacks(select_on, path, dataset_fn=batches(),
                                    class_names=["background", "fg"])
    assert isinstance(callbacks[0], TargetCriteria)  # runs before the checkpoint
    history = []
    for epoch, (weight, source_dice) in enumerate([(2.0, 0.5), (-40.0, 0.6), (10.0, 0.7)]):
        set_weight(segmentor, weight)
        logs = {"val_dice": source_dice}
        for callback in callbacks:
            callback.set_model(model)
            callback.on_epoch_end(epoch, logs)
        history.append(logs)
    assert [round(h["oracle/val_dice"], 6) for h in history] == [1.0, 0.0, 1.0]
    assert all("oracle/val_dice_fg" in h for h in history)
    entropies = [h["target_entropy"] for h in history]
    assert entropies[1] < entropies[2] < entropies[0]
    assert callbacks[-1].best_epoch == best_epoch
    restored = threshold_segmentor(weight=0.0)
    restored.load_weights(path)
    chosen = restored.get_layer("head").get_weights()[0][0, 0, 0, 1]
    assert chosen == [2.0, -40.0, 10.0][best_epoch]


def test_fit_puts_criteria_in_logs_before_the_checkpoint(tmp_path):
    import keras
    from uda_tf.methods import SourceOnly
    x_s, y_s = target_data(8, seed=1)
    x_t, y_t = target_data(8, seed=2)  # target labels: only the oracle reads them
    model = SourceOnly(threshold_segmentor(0.5), ["background", "fg"])
    model.compile(seg=keras.optimizers.Adam(1e-2))
    source = tf.data.Dataset.from_tensor_slices((x_s, y_s)).batch(4)
    callbacks = selection_callbacks(
        "target_entropy", str(tmp_path / "best.weights.h5"), class_names=["background", "fg"],
        dataset_fn=lambda: tf.data.Dataset.from_tensor_slices(
            {"image": x_t, "label": y_t, "has_label": np.ones(8, np.int64)}).batch(4))
    history = model.fit(source.repeat(), epochs=2, steps_per_epoch=2, validation_data=source,
                        callbacks=callbacks, verbose=0, shuffle=False)
    for key in ("val_dice", "target_entropy", "target_agreement", "oracle/val_dice"):
        assert len(history.history[key]) == 2, key
    assert callbacks[-1].monitor == "target_entropy" and callbacks[-1].best_epoch is not None
    assert (tmp_path / "best.weights.h5").exists()
