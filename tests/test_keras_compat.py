"""The Keras internals uda_tf relies on (uda_tf/keras_compat.py and the overrides in
methods/base.py) are still there and still called the way the workarounds assume.

Overriding a private method that Keras renamed or stopped calling fails silently: the
override is simply never used. These tests fail instead, naming the internal, when a Keras
upgrade moves one of them (constraints.txt pins the version they were verified on)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from uda_tf import keras_compat


def tiny_model(base=keras.Model):
    inputs = keras.Input((4,))
    inner = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization()],
                             name="inner")
    outputs = keras.layers.Dense(1, name="head")(inner(inputs))
    return inputs, outputs


class Spy(keras.Model):
    """Records which private Trainer hooks `fit` and `evaluate` call."""
    calls: list

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        self.calls.append("_maybe_symbolic_build")
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function):
        self.calls.append("_make_function")
        return super()._make_function(step_function)

    def _get_metrics_result_or_logs(self, logs):
        self.calls.append("_get_metrics_result_or_logs")
        return super()._get_metrics_result_or_logs(logs)


def test_fit_and_evaluate_still_call_the_private_hooks_methods_override():
    inputs, outputs = tiny_model()
    model = Spy(inputs, outputs)
    model.calls = []
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = np.ones((4, 4), "float32"), np.zeros((4, 1), "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    model.fit(ds, epochs=1, verbose=0)
    model.evaluate(ds, verbose=0)
    for hook in ("_maybe_symbolic_build", "_make_function", "_get_metrics_result_or_logs"):
        assert hook in model.calls, f"Keras {keras.__version__} no longer calls {hook}"


def test_all_layers_walks_nested_models_and_needs_symbolic_build_follows_build_state():
    inputs, outputs = tiny_model()
    model = keras.Model(inputs, outputs)
    names = [layer.name for layer in keras_compat.all_layers(model)]
    assert "inner" in names and "head" in names
    assert any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in keras_compat.all_layers(model))  # inside the nested model

    opt = keras.optimizers.Adam()
    model.all_optimizers = lambda: [opt]
    assert keras_compat.needs_symbolic_build(model)  # the optimizer has no slots yet
    opt.build(model.trainable_variables)
    assert not keras_compat.needs_symbolic_build(model)


def test_shaped_step_is_the_identity_off_multi_worker():
    step = lambda data: {"loss": tf.constant(1.0)}  # noqa: E731
    assert keras_compat.shaped_step(step, tf.distribute.OneDeviceStrategy("/cpu:0")) is step
    assert not keras_compat.in_multi_worker_mode(tf.distribute.OneDeviceStrategy("/cpu:0"))


def test_the_multi_worker_extended_still_has_in_multi_worker_mode():
    from tensorflow.python.distribute import collective_all_reduce_strategy as cars
    assert callable(getattr(cars.CollectiveAllReduceExtended, "_in_multi_worker_mode", None)), \
        "tf.distribute: CollectiveAllReduceExtended._in_multi_worker_mode is gone"


def test_the_pinned_keras_is_the_one_installed():
    import os
    pins = {}
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "constraints.txt")) as f:
        for line in f:
            if "==" in line and not line.startswith("#"):
                name, version = line.strip().split("==")
                pins[name.lower()] = version
    assert pins["keras"] == keras.__version__, (
        f"keras {keras.__version__} installed, constraints.txt pins {pins['keras']}: rerun "
        "make install, or re-verify uda_tf/keras_compat.py and update the pin")
    assert pins["tensorflow"] == tf.__version__


@pytest.mark.parametrize("name", ["_maybe_symbolic_build", "_make_function",
                                  "_get_metrics_result_or_logs"])
def test_each_overridden_hook_exists_on_keras_model(name):
    assert callable(getattr(keras.Model, name, None)), f"keras.Model.{name} is gone"
