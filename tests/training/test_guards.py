"""Divergence: a NaN injected into one batch stops GRL training naming the step and the loss
terms, or, with the rollback policy, is skipped and training ends finite. Gradient norms per
optimizer reach the epoch logs. Backups: atomic, refused for another model."""
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf import losses
from uda_tf.methods import GRL, SourceOnly
from uda_tf.models.discriminators import domain_classifier
from uda_tf.training import guards, resume
from uda_tf.methods.schedules import LambdaSchedule

STEPS, BAD = 4, 5  # 2 epochs of 4 steps; the batch at global step 6 (index 5) holds a NaN


def _grl(seed=0):
    seg = tiny_segmentor(seed=seed)
    keras.utils.set_random_seed(seed + 1)
    model = GRL(seg, CLASS_NAMES,
                domain_classifier=domain_classifier([seg.output["features"].shape[1:]],
                                                    hidden=(8,)),
                lambda_schedule=LambdaSchedule("dann", 1.0, 2 * STEPS))
    model.compile(seg=keras.optimizers.Adam(1e-3), disc=keras.optimizers.Adam(1e-3))
    model.build_optimizers()
    return model


def _batches(bad_index=None):
    items = []
    for i in range(2 * STEPS):
        x_s, y_s, x_t = tiny_batch(seed=i)
        if i == bad_index:
            x_s = x_s.copy()
            x_s[0, 3, 3, 0] = np.nan
        items.append(((x_s, y_s), x_t))
    xs = np.stack([b[0][0] for b in items])
    ys = np.stack([b[0][1] for b in items])
    xt = np.stack([b[1] for b in items])
    return tf.data.Dataset.from_tensor_slices(((xs, ys), xt))


def _fit(model, ds, callbacks):
    model.fit(ds, epochs=2, steps_per_epoch=STEPS, callbacks=callbacks, verbose=0)


def test_nan_batch_stops_naming_step_and_terms(tmp_path):
    model = _grl()
    assert sorted(model.gradient_norms()) == ["disc_optimizer", "seg_optimizer"]
    guard = guards.DivergenceGuard(model.gradient_norms)
    with pytest.raises(guards.DivergenceError) as info:
        _fit(model, _batches(BAD), [guard])
    message = str(info.value)
    assert "step 6 (epoch 1, batch 1)" in message
    for term in ("seg_loss=nan", "grad_norm/seg_optimizer=nan",
                 "grad_norm/disc_optimizer=nan"):
        assert term in message, message
    # only the bad terms: lambda stays finite. (domain_loss is NaN or not depending on how
    # TensorFlow fuses the ReLU after a convolution: max(0, NaN) may be 0.)
    assert "lambda" not in message
    assert "--on_divergence=rollback" in message


def test_rollback_skips_the_bad_batch_and_logs_gradient_norms(tmp_path):
    model = _grl()
    backup = resume.TrainingBackup(str(tmp_path / "backup"), steps_per_epoch=STEPS,
                                   every_steps=2)
    guard = guards.DivergenceGuard(model.gradient_norms, policy="rollback",
                                   backup=backup, max_rollbacks=1)
    history = model.fit(_batches(BAD), epochs=2, steps_per_epoch=STEPS, verbose=0,
                        callbacks=[guard, backup])
    [event] = guard.rollbacks
    assert event["step"] == 6 and event["backup"] == str(tmp_path / "backup" / "step-000000004")
    assert {"seg_loss", "grad_norm/seg_optimizer"} <= set(event["terms"])
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)
    for name in ("grad_norm/seg_optimizer", "grad_norm/disc_optimizer"):
        values = history.history[name]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert history.history["rollbacks"][-1] == 1.0
    assert all(math.isfinite(v) for v in history.history["seg_loss"])


def test_gradient_norm_is_the_norm_of_the_applied_gradient():
    model = SourceOnly(tiny_segmentor(), CLASS_NAMES)
    model.compile(seg=keras.optimizers.SGD(0.0))
    model.build_optimizers()
    x_s, y_s, _ = tiny_batch()
    variables = model.segmentor.trainable_variables
    with tf.GradientTape() as tape:
        logits = model.segmentor(x_s, training=True)["logits"]
        loss = losses.replica_mean(model.supervised_loss(y_s, logits))
    expected = float(tf.linalg.global_norm(tape.gradient(loss, variables)))
    model.fit(tf.data.Dataset.from_tensors((x_s, y_s)), epochs=1, steps_per_epoch=1, verbose=0)
    assert model.gradient_norms()["seg_optimizer"] == pytest.approx(expected, rel=1e-5)


def test_second_divergence_beyond_max_rollbacks_stops(tmp_path):
    model = _grl()
    backup = resume.TrainingBackup(str(tmp_path / "b"), steps_per_epoch=STEPS, every_steps=1)
    guard = guards.DivergenceGuard(model.gradient_norms, policy="rollback",
                                   backup=backup, max_rollbacks=0)
    with pytest.raises(guards.DivergenceError, match=r"step 6 .*after 0 rollbacks"):
        _fit(model, _batches(BAD), [guard, backup])


def test_backup_restores_every_optimizer_and_refuses_another_model(tmp_path):
    a = _grl(seed=0)
    backup = resume.TrainingBackup(str(tmp_path / "b"), steps_per_epoch=STEPS, every_steps=3)
    _fit(a, _batches(), [backup])
    names = sorted(os.listdir(tmp_path / "b"))
    assert names == [f"step-{6:09d}", f"step-{8:09d}"]  # newest two; no partial left
    state = json.loads((tmp_path / "b" / names[-1] / "state.json").read_text())
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert state["groups"]["optimizer/disc_optimizer"] > 1

    b = _grl(seed=5)
    restorer = resume.TrainingBackup(str(tmp_path / "b"), steps_per_epoch=STEPS)
    assert restorer.restore(b)["batches"] == 8
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    for opt in ("seg", "disc"):
        for va, vb in zip(a.optimizers[opt].variables, b.optimizers[opt].variables):
            np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert int(b.optimizers["disc"].iterations.numpy()) == 8

    seg = tiny_segmentor()
    other = GRL(seg, CLASS_NAMES,
                domain_classifier=domain_classifier([seg.output["features"].shape[1:]],
                                                    hidden=(4, 4)),
                lambda_schedule=LambdaSchedule("constant", 1.0, 8))
    other.compile(seg=keras.optimizers.Adam(), disc=keras.optimizers.Adam())
    other.build_optimizers()
    with pytest.raises(resume.BackupError, match=r"step-000000008.*another model"):
        resume.TrainingBackup(str(tmp_path / "b"), steps_per_epoch=STEPS).restore(other)
    changed = resume.TrainingBackup(str(tmp_path / "b"), steps_per_epoch=STEPS,
                                    flags={"epochs": 3})
    with pytest.raises(resume.BackupError, match=r"--epochs: backup None, now 3"):
        changed.restore(_grl())


def test_gradient_norm_on_two_replicas_covers_every_replica(two_replicas):
    """On R replicas the recorded norm is sqrt(sum_r |g_r|^2) of the replicas' own gradients
    (SegmentationMethod._record_norm): every replica counts, not the first one only."""
    x_s, y_s, _ = tiny_batch(n=4)
    with two_replicas.scope():
        model = SourceOnly(tiny_segmentor(), CLASS_NAMES)
        model.compile(seg=keras.optimizers.SGD(0.0))
    variables = model.segmentor.trainable_variables
    squares = 0.0
    for half in (slice(0, 2), slice(2, 4)):  # what each replica sees of the global batch
        with tf.GradientTape() as tape:
            logits = model.segmentor(x_s[half], training=True)["logits"]
            loss = tf.reduce_sum(model.supervised_loss(y_s[half], logits)) / 4.0
        squares += float(tf.linalg.global_norm(tape.gradient(loss, variables))) ** 2
    model.fit(tf.data.Dataset.from_tensors((x_s, y_s)), epochs=1, steps_per_epoch=1, verbose=0)
    assert model.gradient_norms()["seg_optimizer"] == pytest.approx(math.sqrt(squares),
                                                                    rel=1e-4)
