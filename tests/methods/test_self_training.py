"""Self-training: the teacher's confident pixels (and only those) train the student on target;
the teacher changes only between rounds; 2 replicas update like 1 device."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf.methods import SourceOnly
from uda_tf.methods.self_training import (SelfTraining, TeacherRounds, masked_cross_entropy,
                                          pseudo_labels)


def _build(strategy, threshold=0.0, warmup=False, lr=0.05, criterion="confidence"):
    with strategy.scope():
        seg = tiny_segmentor(sync=strategy.num_replicas_in_sync > 1, seed=0)
        teacher = keras.models.clone_model(seg)
        model = SelfTraining(seg, CLASS_NAMES, teacher=teacher, criterion=criterion,
                             threshold=threshold, warmup=warmup)
        model.compile(seg=keras.optimizers.SGD(lr))
        model.build_optimizers()
    return model


def _fit(model, steps=2, callbacks=(), epochs=1):
    x_s, y_s, x_t = tiny_batch(n=4)
    ds = tf.data.Dataset.from_tensors(((x_s, y_s), x_t)).repeat()
    return model.fit(ds, epochs=epochs, steps_per_epoch=steps, verbose=0,
                     callbacks=list(callbacks)).history


def test_pseudo_label_filters():
    probs = tf.constant([[[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.1, 0.85, 0.05]]])
    labels, mask = pseudo_labels(probs, "confidence", 0.8)
    np.testing.assert_array_equal(labels.numpy(), [[0, 0, 1]])
    np.testing.assert_array_equal(mask.numpy(), [[1, 0, 1]])
    ent = -(probs * tf.math.log(probs)).numpy().sum(-1) / np.log(3)
    _, mask = pseudo_labels(probs, "entropy", float(ent[0, 2]) + 1e-6)
    np.testing.assert_array_equal(mask.numpy(), [[1, 0, 1]])
    with pytest.raises(ValueError, match="pseudo-label criterion"):
        pseudo_labels(probs, "margin", 0.5)


def test_masked_cross_entropy_counts_rejected_pixels_as_zero():
    logits = tf.constant([[[2.0, 0.0], [0.0, 1.0]]])  # [1, 2 pixels, 2 classes]
    labels = tf.constant([[0, 0]])
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy()
    out = masked_cross_entropy(labels, logits, tf.constant([[1.0, 0.0]])).numpy()
    np.testing.assert_allclose(out, [ce[0, 0] / 2], rtol=1e-6)


def test_teacher_is_fixed_within_a_round_and_student_learns(one_device):
    model = _build(one_device)
    teacher_before = [w.numpy().copy() for w in model.teacher.weights]
    student_before = [w.numpy().copy() for w in model.segmentor.trainable_weights]
    logs = _fit(model)
    for a, w in zip(teacher_before, model.teacher.weights):
        np.testing.assert_array_equal(a, w.numpy())
    assert any(not np.allclose(a, w.numpy())
               for a, w in zip(student_before, model.segmentor.trainable_weights))
    assert logs["pseudo_fraction"][-1] == pytest.approx(1.0)  # threshold 0 keeps every pixel
    assert all(v.name != "pseudo_active" for v in model.trainable_variables)


def test_no_confident_pixel_means_a_source_only_step(one_device):
    """With a threshold no pixel reaches, the update is exactly source-only's."""
    st = _build(one_device, threshold=1.01)
    with one_device.scope():
        so = SourceOnly(tiny_segmentor(seed=0), CLASS_NAMES)
        so.compile(seg=keras.optimizers.SGD(0.05))
        so.build_optimizers()
    logs = _fit(st)
    x_s, y_s, _ = tiny_batch(n=4)
    so.fit(tf.data.Dataset.from_tensors((x_s, y_s)).repeat(), epochs=1, steps_per_epoch=2,
           verbose=0)
    assert logs["pseudo_fraction"][-1] == 0.0
    for a, b in zip(st.segmentor.trainable_weights, so.segmentor.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_warmup_round_ignores_pseudo_labels_then_rounds_refresh_the_teacher(one_device):
    model = _build(one_device, warmup=True)
    assert float(model.pseudo_active.numpy()) == 0.0
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append([w.numpy().copy() for w in model.teacher.weights])

    _fit(model, steps=1, epochs=3, callbacks=[TeacherRounds(2), Spy()])
    assert float(model.pseudo_active.numpy()) == 1.0
    # epoch 1: same teacher as epoch 0; epoch 2 (a new round): the student's epoch-1 weights
    for a, b in zip(seen[0], seen[1]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(seen[1], seen[2]))


@pytest.mark.slow
def test_two_replicas_match_one_device(one_device, two_replicas):
    results = []
    for strategy in (one_device, two_replicas):
        model = _build(strategy, threshold=0.3)
        logs = _fit(model)
        results.append(([v.numpy() for v in model.segmentor.trainable_weights], logs))
    (w1, l1), (w2, l2) = results
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l1["pseudo_loss"], l2["pseudo_loss"], rtol=1e-5)
    assert 0.0 < l1["pseudo_fraction"][-1] <= 1.0
