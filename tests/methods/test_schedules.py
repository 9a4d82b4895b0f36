"""Learning-rate schedules: values at known steps, warm-up, serialisation."""
import math

import keras
import pytest

from uda_tf.methods.schedules import LR_SCHEDULES, Warmup, lr_schedule


def _schedule(kind, lr, total_steps=100, steps_per_epoch=10, decay=0.75, warmup_steps=0):
    return lr_schedule(kind, lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                       decay=decay, warmup_steps=warmup_steps)


@pytest.mark.parametrize("schedule,expected", [
    (_schedule("step", 1.0, steps_per_epoch=10, decay=0.75),
     {0: 1.0, 9: 1.0, 10: 0.75, 25: 0.5625}),
    (_schedule("poly", 1.0, total_steps=100),
     {0: 1.0, 50: 0.5 ** 0.9, 99: 0.01 ** 0.9, 100: 0.0, 150: 0.0}),
    (_schedule("cosine", 2.0, total_steps=100),
     {0: 2.0, 50: 1.0, 75: 1.0 - math.sqrt(0.5), 100: 0.0}),
    (_schedule("constant", 0.1), {0: 0.1, 1000: 0.1}),
    # warm-up: x (step + 1) / warmup_steps until the full rate, on top of the shape
    (_schedule("constant", 1.0, warmup_steps=4), {0: 0.25, 1: 0.5, 3: 1.0, 10: 1.0}),
    (_schedule("step", 1.0, steps_per_epoch=2, decay=0.5, warmup_steps=4),
     {0: 0.25, 1: 0.5, 2: 0.375, 3: 0.5, 4: 0.25}),
])
def test_values_at_known_steps(schedule, expected):
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


@pytest.mark.parametrize("kind,keras_class", [
    ("step", keras.optimizers.schedules.ExponentialDecay),
    ("poly", keras.optimizers.schedules.PolynomialDecay),
    ("cosine", keras.optimizers.schedules.CosineDecay)])
def test_shapes_are_keras_schedules(kind, keras_class):
    assert type(_schedule(kind, 0.01).schedule) is keras_class


@pytest.mark.parametrize("kind", sorted(LR_SCHEDULES))
def test_serialisable_and_usable_by_an_optimizer(kind):
    schedule = lr_schedule(kind, 0.01, total_steps=100, steps_per_epoch=10, warmup_steps=3)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule))
    assert type(restored) is Warmup and restored.get_config() == schedule.get_config()
    opt = keras.optimizers.Adam.from_config(keras.optimizers.Adam(schedule).get_config())
    opt.iterations.assign(37)
    assert float(opt.learning_rate) == pytest.approx(float(schedule(37)))


def test_bad_schedule_names_the_value():
    with pytest.raises(ValueError, match="'linear'"):
        lr_schedule("linear", 0.1, total_steps=10, steps_per_epoch=1)
    with pytest.raises(ValueError, match="--lr_decay"):
        lr_schedule("step", 0.1, total_steps=10, steps_per_epoch=10, decay=1.5)
