"""Mean teacher: the EMA update is exact (ramp included); the student's strong view and the
teacher's probabilities are moved by one shared transform, out-of-view pixels masked; 2
replicas update like 1 device; the teacher is what is validated, checkpointed, exported and
backed up; 2D/3D, softmax/sigmoid; the teacher/student agreement criterion."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf.data import augment
from uda_tf.methods import METHODS, SourceOnly
from uda_tf.methods.mean_teacher import (MeanTeacher, StrongView, consistency, ema_decay_at,
                                         sigmoid_rampup)
from uda_tf.models.unet import residual_unet

# A deterministic strong view: every sample flipped on both axes and zoomed out to 0.8 (a
# border comes from outside the field of view), no intensity op.
FIXED_VIEW = ("flip,scaling", {"p_flip": 1.0, "p_scaling": 1.0, "scale_range": (0.8, 0.8)})


def _params(**overrides):
    return {**augment.parameter_defaults(), **overrides}


def _build(strategy=None, norm="instance", view=("none", {}), lr=0.05, **kwargs):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        seg = tiny_segmentor(norm=norm, sync=strategy.num_replicas_in_sync > 1, seed=0)
        model = MeanTeacher(seg, CLASS_NAMES, teacher=keras.models.clone_model(seg),
                            student_augment=view[0], student_augment_params=view[1], **kwargs)
        model.compile(seg=keras.optimizers.SGD(lr))
    return model


def _fit(model, steps=1, n=4):
    x_s, y_s, x_t = tiny_batch(n=n)
    ds = tf.data.Dataset.from_tensors(((x_s, y_s), x_t)).repeat()
    model.run_eagerly = True  # a few steps: faster run than traced, the same updates
    return model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0).history


def _values(network):
    return [w.numpy().astype(np.float64) for w in network.weights]


def test_ema_update_is_exact_including_the_ramp():
    """t <- a t + (1 - a) s after each step, a = min(1 - 1/(step + 1), decay): 0 at step 0
    (teacher = student), 1/2 at step 1, then the decay. BatchNorm statistics too."""
    model = _build(norm="batch", ema_decay=0.6, rampup_steps=0)
    assert int(model.ema_step.numpy()) == 0
    for t, s in zip(model.teacher.weights, model.segmentor.weights):
        np.testing.assert_array_equal(t.numpy(), s.numpy())  # starts as the student
    teacher = _values(model.teacher)
    for step, decay in enumerate([0.0, 0.5, 0.6]):  # min(1 - 1/(step + 1), 0.6)
        assert float(ema_decay_at(step, 0.6)) == pytest.approx(decay)
        _fit(model)
        student = _values(model.segmentor)
        expected = [decay * t + (1 - decay) * s for t, s in zip(teacher, student)]
        for e, t in zip(expected, model.teacher.weights):
            np.testing.assert_allclose(t.numpy(), e, atol=1e-6, rtol=0)
        teacher = _values(model.teacher)
        assert int(model.ema_step.numpy()) == step + 1
    moving = [i for i, w in enumerate(model.segmentor.weights) if "moving" in w.path]
    assert moving and not np.allclose(teacher[moving[0]], student[moving[0]])
    assert not any(w is t for w in model.trainable_variables for t in model.teacher.weights)


def test_ramps():
    assert float(sigmoid_rampup(0, 10)) == pytest.approx(np.exp(-5.0))
    assert float(sigmoid_rampup(5, 10)) == pytest.approx(np.exp(-1.25))
    assert float(sigmoid_rampup(10, 10)) == float(sigmoid_rampup(99, 10)) == 1.0
    assert float(sigmoid_rampup(0, 0)) == 1.0
    assert float(ema_decay_at(10**6, 0.99)) == pytest.approx(0.99)


def _identity_teacher_view(names, params, shape, seed=0):
    """Images whose channels are a one-hot pattern; an identity 'teacher' predicts exactly
    that pattern, so the probabilities moved with the student's view must equal the
    student's image wherever the pixel is in view."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 3, shape[:-1])
    images = tf.one_hot(pattern, 3, dtype=tf.float32)
    tf.random.set_seed(seed)
    student, aligned, valid = StrongView(names, _params(**params))(images, images)
    return images.numpy(), student.numpy(), aligned.numpy(), valid.numpy()


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 8, 12, 10)])
def test_teacher_probabilities_follow_the_students_transform(shape):
    """Random flips, rotation, zoom and elastic deformation on every sample: the student's
    image and the teacher's moved probabilities agree pixel for pixel (in view), and that
    comparison would fail without the shared transform (the image did move)."""
    params = {"p_flip": 1.0, "p_rotation": 1.0, "p_scaling": 1.0, "p_elastic": 1.0,
              "rotation_degrees": 30.0}
    images, student, aligned, valid = _identity_teacher_view(
        "flip,rotation,scaling,elastic", params, (*shape, 3))
    inside = valid > 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(aligned[inside], student[inside], atol=1e-5)
    assert np.abs(student - images)[inside].max() > 0.5  # untransformed probs would differ
    # argmax of the moved probabilities = argmax of the student's one-hot image
    assert (np.argmax(aligned, -1) == np.argmax(student, -1))[inside].mean() > 0.999


def test_flips_alone_are_exact_and_keep_every_pixel():
    images, student, aligned, valid = _identity_teacher_view("flip", {"p_flip": 1.0},
                                                             (2, 16, 16, 3))
    np.testing.assert_array_equal(student, images[:, ::-1, ::-1])
    np.testing.assert_array_equal(aligned, student)
    assert valid.min() == 1.0


def test_randomised_intensities_in_the_strong_view():
    """GIN changes the student's (unlabelled) view; label_intensity, which reads labels, is
    left out of it as augment leaves it out of unlabelled batches."""
    params = {**augment.parameter_defaults(), "p_gin": 1.0, "gin_layers": 2}
    assert "label_intensity" not in StrongView("randomized", params).intensity
    view = StrongView("gin", params)
    images = tf.random.uniform([2, 16, 16, 1], seed=1)
    probs = tf.nn.softmax(tf.random.normal([2, 16, 16, 3], seed=2))
    student, aligned, valid = view(images, probs)
    assert float(tf.reduce_max(tf.abs(student - images))) > 1e-3
    np.testing.assert_array_equal(aligned.numpy(), probs.numpy())  # no spatial op: unmoved
    assert float(tf.reduce_min(valid)) == 1.0


def test_out_of_view_pixels_are_masked():
    """Zoomed out to 0.5: the outer ring comes from outside the image. There the mask is 0,
    the moved probabilities are 0, the student's image is the sample's minimum, and the
    consistency ignores whatever the student predicts."""
    images = tf.random.stateless_uniform([2, 16, 16, 1], [1, 2], 2.0, 3.0)
    probs = tf.nn.softmax(tf.random.stateless_normal([2, 16, 16, 3], [3, 4]))
    view = StrongView("scaling", _params(p_scaling=1.0, scale_range=(0.5, 0.5)))
    student, aligned, valid = view(images, probs)
    valid = valid.numpy()
    assert valid[:, 0, 0].max() == 0 and valid[:, 8, 8].min() == 1
    assert 0.2 < valid.mean() < 0.4  # about a quarter of the area stays in view
    outside = valid == 0
    np.testing.assert_array_equal(aligned.numpy()[outside], 0.0)
    low = images.numpy().min(axis=(1, 2, 3))
    np.testing.assert_allclose(student.numpy()[..., 0][outside],
                               np.broadcast_to(low[:, None, None], outside.shape)[outside])
    logits = tf.math.log(aligned + 1e-6)  # the student agrees with the teacher in view ...
    noisy = tf.where(valid[..., None] > 0, logits, 10.0 * tf.random.normal(logits.shape))
    for kind in ("mse", "ce"):
        clean, fraction = consistency(kind, logits, aligned, tf.constant(valid), 0.0)
        masked, _ = consistency(kind, noisy, aligned, tf.constant(valid), 0.0)
        np.testing.assert_allclose(masked.numpy(), clean.numpy(), rtol=1e-6)  # ... outside
        np.testing.assert_allclose(fraction.numpy(), valid.mean(axis=(1, 2)))


def test_consistency_losses():
    teacher = tf.constant([[[0.95, 0.05], [0.6, 0.4]]])  # [1, 2 pixels, 2 classes]
    logits = tf.constant([[[0.0, 0.0], [0.0, 0.0]]])  # student: 0.5 / 0.5 everywhere
    valid = tf.constant([[1.0, 1.0]])
    mse, _ = consistency("mse", logits, teacher, valid, 0.9)
    np.testing.assert_allclose(mse.numpy(), [(0.45 ** 2 + 0.1 ** 2) / 2], rtol=1e-6)
    ce, fraction = consistency("ce", logits, teacher, valid, 0.9)  # pixel 2 not confident
    np.testing.assert_allclose(ce.numpy(), [np.log(2) / 2], rtol=1e-6)
    np.testing.assert_allclose(fraction.numpy(), [0.5])
    with pytest.raises(ValueError, match="--consistency_loss"):
        consistency("kl", logits, teacher, valid, 0.9)


@pytest.mark.slow
def test_two_replicas_match_one_device(one_device, two_replicas):
    """Same global batch, same deterministic strong view (out-of-view border included): the
    student, the teacher (its weights and its BatchNorm statistics, synchronised across
    replicas) and the step counter end up the same."""
    runs = []
    for strategy in (one_device, two_replicas):
        model = _build(strategy, norm="batch", view=FIXED_VIEW, rampup_steps=0, ema_decay=0.5,
                       consistency_weight=5.0, minent_weight=0.1)
        logs = _fit(model, steps=2)
        runs.append((model, logs))
    (m1, logs1), (m2, logs2) = runs
    for a, b in zip(m1.segmentor.weights + m1.teacher.weights,
                    m2.segmentor.weights + m2.teacher.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)
    assert int(m1.ema_step.numpy()) == int(m2.ema_step.numpy()) == 2
    for key in ("seg_loss", "cons_loss", "cons_fraction"):
        np.testing.assert_allclose(logs1[key], logs2[key], rtol=1e-5)
    assert 0.5 < logs1["cons_fraction"][-1] < 1.0  # the border was masked


def test_the_teacher_is_validated_and_the_backup_restores_it(tmp_path):
    from uda_tf.training import resume
    model = _build(view=("full", {}), ema_decay=0.9)
    _fit(model, steps=3)
    assert model.kept_network() is model.teacher and model.paired_network() is model.segmentor
    x_s, y_s, _ = tiny_batch(n=4, seed=1)
    with_teacher = SourceOnly(model.teacher, CLASS_NAMES)
    with_teacher.compile(seg=keras.optimizers.SGD(0.0))
    ds = tf.data.Dataset.from_tensors((x_s, y_s))
    assert model.evaluate(ds, return_dict=True, verbose=0) == \
        with_teacher.evaluate(ds, return_dict=True, verbose=0)
    backup = resume.TrainingBackup(str(tmp_path), steps_per_epoch=3)
    backup.set_model(model)
    backup.save()
    fresh = _build(view=("full", {}), ema_decay=0.9)
    assert not np.allclose(fresh.teacher.weights[0].numpy(), model.teacher.weights[0].numpy())
    resume.TrainingBackup(str(tmp_path), steps_per_epoch=3).restore(fresh)
    for a, b in zip(model.teacher.weights + model.segmentor.weights,
                    fresh.teacher.weights + fresh.segmentor.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.ema_step.numpy()) == 3


@pytest.mark.parametrize("shape,classes,kind", [((16, 16, 8, 1), 3, "mse"),
                                                ((16, 16, 1), 2, "ce")])
def test_train_step_2d_3d_softmax_sigmoid(shape, classes, kind):
    """The default strong view (spatial + intensity) on 3D softmax and 2D sigmoid
    segmentors: finite losses, the teacher moved."""
    keras.utils.set_random_seed(0)
    seg = residual_unet(shape, 1 if classes == 2 else classes, base_filters=4, depth=2)
    names = CLASS_NAMES[:classes]
    model = MeanTeacher(seg, names, teacher=keras.models.clone_model(seg), minent_weight=0.1,
                        consistency_loss=kind, consistency_threshold=0.5, rampup_steps=0)
    model.compile(seg=keras.optimizers.SGD(0.05))
    rng = np.random.default_rng(0)
    x_s = rng.random((2, *shape), dtype=np.float32)
    y_s = (x_s[..., 0] > 0.5).astype(np.uint8)
    x_t = 0.5 + 0.5 * rng.random((2, *shape), dtype=np.float32)
    before = _values(model.teacher)
    logs = model.fit(tf.data.Dataset.from_tensors(((x_s, y_s), x_t)).repeat(), epochs=1,
                     steps_per_epoch=2, verbose=0).history
    assert all(np.isfinite(v[-1]) for v in logs.values())
    assert 0 < logs["cons_fraction"][-1] <= 1
    assert not np.allclose(before[0], model.teacher.weights[0].numpy())


def test_settings_are_flags_with_clear_errors():
    cls = METHODS["mean_teacher"]
    config = cls.configure({})
    assert (config.ema_decay, config.consistency_loss, config.mt_export) == \
        (0.99, "mse", "teacher")
    with pytest.raises(ValueError, match="--ema_decay must be < 1"):
        cls.configure({"ema_decay": 1.0})
    with pytest.raises(ValueError, match="--mt_student_augment='twirl'"):
        cls.configure({"mt_student_augment": "twirl"})
    with pytest.raises(ValueError, match="--mt_student_augment_params: 'spin=3'"):
        cls.configure({"mt_student_augment_params": ["spin=3"]})
    with pytest.raises(ValueError, match="p_noise must be a probability"):
        cls.configure({"mt_student_augment_params": ["p_noise=2"]})
    with pytest.raises(ValueError, match="--consistency_loss"):
        cls.configure({"consistency_loss": "kl"})


def test_teacher_agreement_criterion():
    from uda_tf.training.selection import (TargetCriteria, check_model, selection_monitor)
    assert selection_monitor("target_teacher_agreement") == ("target_teacher_agreement", "max")
    x, _, _ = tiny_batch(6)
    criteria = TargetCriteria(lambda: [x[:4], x[4:]], oracle=False)
    one, other = tiny_segmentor(seed=0), tiny_segmentor(seed=1)
    assert criteria.compute(one, one)["target_teacher_agreement"] == 1.0
    value = criteria.compute(one, other)["target_teacher_agreement"]
    # the pooled foreground Dice between the two argmax maps, computed here with numpy
    a = np.argmax(one(x)["logits"].numpy(), -1)
    b = np.argmax(other(x)["logits"].numpy(), -1)
    dice = [2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in (1, 2)]
    assert value == pytest.approx(np.mean(dice), abs=1e-6) and value < 1.0
    assert "target_teacher_agreement" not in criteria.compute(one)
    model = _build()
    check_model("target_teacher_agreement", model)
    with pytest.raises(ValueError, match="--select_on=target_teacher_agreement .* no second"):
        check_model("target_teacher_agreement", SourceOnly(one, CLASS_NAMES))


def _train_values(data_dir, out, **overrides):
    from absl import flags
    from uda_tf.cli import train
    train.define_flags()
    values = {name: flags.FLAGS[name].default for name in train._NAMES}
    values.update(data_dir=data_dir, source_domain="dom_a", target_domain="dom_b",
                  method="mean_teacher", target_augment="flip", epochs=1, steps_per_epoch=2,
                  global_batch_size=2, base_filters=2, unet_depth=2, output_dir=str(out),
                  mlflow_tracking_uri=f"sqlite:///{out}/mlflow.db", mlflow_experiment="t",
                  mlflow_sample_slices=0, figures=False, model_name="mt", check_shards=False,
                  backup_every_steps=1, consistency_rampup_steps=0)
    values.update(overrides)
    return values


def _backup_model(cfg, manifest, run_dir):
    """A fresh model of the run with its last backup loaded: the teacher and student as
    training left them."""
    from uda_tf.models import segmentor_from_flags
    from uda_tf.training import resume
    model = MeanTeacher.build(segmentor_from_flags(cfg.flag_values(), manifest),
                              manifest.class_names, cfg.method_config, cfg)
    resume.TrainingBackup(os.path.join(run_dir, resume.BACKUP_DIR),
                          steps_per_epoch=cfg.steps_per_epoch).restore(model)
    return model


@pytest.mark.slow
def test_trains_and_exports_the_teacher(tiny_prepared, tmp_path):
    """Through train.train, selecting on the teacher/student agreement: the checkpoint that
    export_best loads and exports holds the teacher's weights (the backup's), not the
    student's; the backup holds the step counter."""
    from uda_tf.cli import train
    from uda_tf.models import segmentor_from_flags
    from uda_tf.training.config import RunConfig
    data_dir, manifest = tiny_prepared
    cfg = RunConfig.from_flags(_train_values(data_dir, tmp_path, run_name="mt",
                                             select_on="target_teacher_agreement"))
    result = train.train(cfg)
    assert os.path.isfile(os.path.join(result["saved_model"], "saved_model.pb"))
    assert result["exported_weights"] == result["checkpoint"]
    assert result["selection"]["monitor"] == "target_teacher_agreement"
    assert 0 <= result["selection"]["best"] <= 1
    backups = os.path.join(result["run_dir"], "backup")
    state = json.load(open(os.path.join(backups, sorted(os.listdir(backups))[-1],
                                        "state.json")))
    assert state["batches"] == 2
    model = _backup_model(cfg, manifest, result["run_dir"])
    assert int(model.ema_step.numpy()) == 2
    kept = segmentor_from_flags(cfg.flag_values(), manifest)
    kept.load_weights(result["checkpoint"])  # what export_best loads and exports
    for a, b in zip(kept.weights, model.teacher.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(kept.weights, model.segmentor.weights))


@pytest.mark.parametrize("export", ["student"])
def test_the_best_checkpoint_holds_the_kept_network(tmp_path, export):
    """--mt_export chooses what BestSegmentorCheckpoint writes (train.py exports that file;
    the default, teacher, through train.train in test_trains_and_exports_the_teacher)."""
    from uda_tf.training.callbacks import BestSegmentorCheckpoint
    model = _build(export=export)
    _fit(model, steps=2)
    path = str(tmp_path / "best.weights.h5")
    checkpoint = BestSegmentorCheckpoint(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_dice": 0.5})
    saved = tiny_segmentor(seed=3)
    saved.load_weights(path)
    chosen = model.teacher if export == "teacher" else model.segmentor
    other = model.segmentor if export == "teacher" else model.teacher
    assert model.kept_network() is chosen and model.paired_network() is other
    for a, b in zip(saved.weights, chosen.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(saved.weights[0].numpy(), other.weights[0].numpy())
