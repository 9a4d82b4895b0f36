"""Mean teacher (self-ensembling) for domain adaptation of segmentation.

The student is the segmentor: Dice + CE on labelled source images plus a consistency term on
target images. The teacher is an exponential moving average (EMA) of the student's weights,
updated after every step. The teacher sees each target batch as the data pipeline delivers it
(the weak view: --target_augment=flip or none); the student sees a strong view of the same
batch, made here inside train_step: one random spatial transform (flips, rotation, scaling,
elastic deformation), then random intensity ops. The spatial transform is applied to the
teacher's class probabilities too, in the same resampling pass as the image, so that the two
predictions compare the same anatomy pixel by pixel; pixels the transform brings in from
outside the field of view do not count. The consistency is the mean squared difference of
the class probabilities (`mse`) or the cross-entropy to the teacher's label on its confident
pixels (`ce`), weighted by a sigmoid ramp-up.

Sources, in our own words:
* Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017: the EMA
  teacher, the decay ramp min(1 - 1/(step + 1), decay) that lets the teacher follow the
  student closely at first, the MSE consistency and the exp(-5 (1 - t)^2) ramp-up.
* French, Mackiewicz & Fisher, "Self-ensembling for visual domain adaptation", ICLR 2018: the
  teacher/student pair for domain adaptation (student on source labels + target consistency),
  confidence-thresholded consistency, and strong augmentation of the student's input.
* Perone, Ballester, Barros & Cohen-Adad, "Unsupervised domain adaptation for medical imaging
  segmentation with self-ensembling", NeuroImage 2019: the segmentation version, where the
  spatial augmentation of the student's input must be applied to the teacher's prediction so
  the two line up, and where MSE worked better than cross-entropy (EMA decay 0.99 / 0.995).

By default the teacher is what is validated, checkpointed and exported (`kept_network`;
--mt_export=student keeps the student): an average of the student's recent weights, it is
usually the steadier of the two (Tarvainen & Valpola 2017 report it as the better model).
"""
from __future__ import annotations

import dataclasses
import inspect

import keras
import tensorflow as tf
from absl import logging

from uda_tf import losses
from uda_tf.data import augment
from uda_tf.methods import register
from uda_tf.methods.base import SegmentationMethod, split_batch
from uda_tf.methods.settings import setting
from uda_tf.models import heads

CONSISTENCY_LOSSES = ("mse", "ce")
EXPORTS = ("teacher", "student")


def check_student_augment(name: str, value) -> None:
    """--mt_student_augment: a preset or op names of uda_tf.data.augment whose ops can change
    an unlabelled batch (spatial ops, and intensity ops taking `active`)."""
    for op in augment.check_names_flag(name, value):
        fn = augment.OPS[op].fn
        if fn is not None and "active" not in inspect.signature(fn).parameters:
            raise ValueError(f"--{name}: augmentation {op!r} cannot be applied to a chosen "
                             "subset of the student's batch (its function takes no `active`)")


def ema_decay_at(step, decay: float):
    """The teacher's decay at update `step` (0 = the first): min(1 - 1/(step + 1), decay), so
    that the teacher is the student after the first update and an average over the steps so
    far until the decay takes over (Tarvainen & Valpola 2017)."""
    step = tf.cast(step, tf.float32)
    return tf.minimum(1.0 - 1.0 / (step + 1.0), float(decay))


def sigmoid_rampup(step, rampup_steps: int):
    """exp(-5 (1 - t)^2) with t = step / rampup_steps clipped to [0, 1]; 1 throughout when
    rampup_steps is 0 (Laine & Aila 2017, used by Tarvainen & Valpola 2017)."""
    if rampup_steps <= 0:
        return tf.constant(1.0)
    t = tf.clip_by_value(tf.cast(step, tf.float32) / float(rampup_steps), 0.0, 1.0)
    return tf.exp(-5.0 * tf.square(1.0 - t))


class StrongView:
    """The student's view of a target batch and the teacher's probabilities moved with it.

    `names`: augmentation op names (augment.resolve_names); `params`: every op parameter and
    `p_<name>` probability (augment.parameter_defaults() updated with the user's). Each op
    fires per sample with its probability, as in augment.build, over the whole batch with
    masks (augment.Augmenter.masked_spatial / masked_intensity: no gather, no dynamic shape,
    so it runs on every replica alike). Called on images [N, *S, C] and the teacher's
    probabilities [N, *S, K], it returns (student images, probabilities aligned with them,
    valid [N, *S] float: 1 where the pixel comes from inside the field of view)."""

    def __init__(self, names, params: dict):
        self.augmenter = augment.Augmenter(augment.resolve_names(names), params, jit=False)
        # Ops that read labels (label_intensity) leave unlabelled images alone, as augment's
        # do: the student's view is of target images.
        self.intensity = self.augmenter.intensity_names(self.augmenter.names, None)

    def __call__(self, images, probs):
        images = tf.convert_to_tensor(images)
        channels = images.shape[-1]
        rank = images.shape.rank - 2
        # One resampling pass of [image - min, probabilities, ones]: shared coordinates, the
        # image interpolated as augment does, the probabilities bilinearly. The pass fills
        # the outside with the stack's minimum, which is 0 here (the shifted image's minimum
        # is exactly 0, probabilities are >= 0), so the ones-channel marks the inside, the
        # outside probabilities are 0 and the image's outside is its own minimum, as in
        # augment_spatial.spatial_transform.
        low = tf.reduce_min(images, axis=list(range(1, rank + 2)), keepdims=True)
        joint = tf.concat([images - low, tf.cast(probs, images.dtype),
                           tf.ones_like(images[..., :1])], axis=-1)
        joint = self.augmenter.masked_spatial(joint)
        student = joint[..., :channels] + low
        aligned = joint[..., channels:-1]
        valid = tf.cast(joint[..., -1] > 0.5, tf.float32)
        return self.augmenter.masked_intensity(student), aligned, valid


def consistency(kind: str, student_logits, teacher_probs, valid, threshold: float):
    """(per-sample consistency loss [N], per-sample fraction of pixels that count [N]).

    mse: mean over classes of (student probability - teacher probability)^2; ce: cross-entropy
    to the teacher's argmax where its max probability >= `threshold`. Averaged over each
    sample's in-view pixels (`valid`); a pixel that does not count contributes 0. Per sample,
    so the replica split does not change it (reduce with losses.replica_mean)."""
    teacher_probs = tf.stop_gradient(tf.cast(teacher_probs, tf.float32))
    if kind == "mse":
        student = heads.class_probabilities(student_logits)
        per_pixel = tf.reduce_mean(tf.square(student - teacher_probs), axis=-1)
        counted = valid
    elif kind == "ce":
        labels = tf.argmax(teacher_probs, axis=-1, output_type=tf.int32)
        confident = tf.cast(tf.reduce_max(teacher_probs, axis=-1) >= threshold, tf.float32)
        per_pixel = losses.pixel_cross_entropy(labels, student_logits)
        counted = valid * confident
    else:
        raise ValueError(f"--consistency_loss={kind!r}: expected one of "
                         f"{', '.join(CONSISTENCY_LOSSES)}")
    axes = list(range(1, valid.shape.rank))
    in_view = tf.maximum(tf.reduce_sum(valid, axis=axes), 1.0)
    return (tf.reduce_sum(per_pixel * counted, axis=axes) / in_view,
            tf.reduce_mean(counted, axis=axes))


@register("mean_teacher")
class MeanTeacher(SegmentationMethod):
    uses_target = True

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        ema_decay: float = setting(
            0.99, "mean_teacher: EMA decay of the teacher's weights (Perone et al. 2019 used "
            "0.99 and 0.995), reached after the ramp min(1 - 1/(step + 1), decay).",
            lower=0, upper=1)
        consistency_loss: str = setting(
            "mse", "mean_teacher: mse (squared difference of class probabilities) or ce "
            "(cross-entropy to the teacher's label on pixels with max probability >= "
            "--consistency_threshold).", choices=CONSISTENCY_LOSSES)
        consistency_weight: float = setting(
            10.0, "mean_teacher: weight of the consistency term after its ramp-up (Perone et "
            "al. used 20 with mse; about 1 suits ce).", lower=0)
        consistency_threshold: float = setting(
            0.9, "mean_teacher: --consistency_loss=ce: the teacher's minimum max probability "
            "for a pixel to count.", lower=0, upper=1)
        consistency_rampup_steps: int = setting(
            1000, "mean_teacher: steps of the sigmoid ramp-up exp(-5 (1 - t)^2) of the "
            "consistency weight (0: full weight from the start).", lower=0)
        mt_student_augment: str = setting(
            "full", "mean_teacher: the student's strong view of each target batch, made in "
            "the training step: a preset or op names as --augment; its spatial part also "
            "moves the teacher's prediction (none: the student sees the teacher's view).",
            check=check_student_augment)
        mt_student_augment_params: tuple = setting(
            (), "mean_teacher: parameters and per-sample probabilities of the student's "
            "augmentation, as --augment_params (e.g. p_rotation=0.5,scale_range=0.8:1.2).",
            kind="list", item=str, check=augment.check_params_flag)
        mt_export: str = setting(
            "teacher", "mean_teacher: which network is validated, checkpointed and exported.",
            choices=EXPORTS)

        def check(self):
            if self.ema_decay >= 1:
                raise ValueError(f"--ema_decay must be < 1 (1 never moves the teacher), got "
                                 f"{self.ema_decay}")

    def __init__(self, segmentor, class_names, *, teacher: keras.Model, ema_decay=0.99,
                 consistency_loss="mse", consistency_weight=10.0, consistency_threshold=0.9,
                 rampup_steps=1000, student_augment="full", student_augment_params=None,
                 export="teacher", **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        self.teacher = teacher
        self.teacher.trainable = False
        self.ema_decay, self.consistency_kind = float(ema_decay), consistency_loss
        self.consistency_weight = float(consistency_weight)
        self.threshold, self.rampup_steps = float(consistency_threshold), int(rampup_steps)
        self.export = export
        params = {**augment.parameter_defaults(), **dict(student_augment_params or {})}
        self.strong_view = StrongView(student_augment, params)
        # Teacher updates done so far: drives the decay and consistency ramps; backed up with
        # the model's variables, so a resumed run goes on where it stopped.
        self.ema_step = keras.Variable(0, dtype="int64", trainable=False, name="ema_step")
        self.cons_loss_tracker = keras.metrics.Mean(name="cons_loss")
        self.cons_fraction_tracker = keras.metrics.Mean(name="cons_fraction")
        self.copy_student_to_teacher()

    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        teacher_view = run.target_augment or run.augment
        strong = [n for n in augment.resolve_names(teacher_view) if n != "flip"]
        if strong:
            logging.warning("mean_teacher: the teacher's target images are augmented with %s "
                            "(--target_augment); its targets are cleaner with "
                            "--target_augment=flip or none", ", ".join(strong))
        return cls(segmentor, class_names, **cls.base_kwargs(config, class_names),
                   teacher=keras.models.clone_model(segmentor), ema_decay=config.ema_decay,
                   consistency_loss=config.consistency_loss,
                   consistency_weight=config.consistency_weight,
                   consistency_threshold=config.consistency_threshold,
                   rampup_steps=config.consistency_rampup_steps,
                   student_augment=config.mt_student_augment,
                   student_augment_params=augment.parse_params(
                       config.mt_student_augment_params, flag="mt_student_augment_params"),
                   export=config.mt_export)

    def kept_network(self):
        return self.teacher if self.export == "teacher" else self.segmentor

    def paired_network(self):
        return self.segmentor if self.export == "teacher" else self.teacher

    @property
    def metrics(self):
        return [*super().metrics, self.cons_loss_tracker, self.cons_fraction_tracker]

    def copy_student_to_teacher(self):
        """Teacher <- student (at construction: the student's initial or --init_checkpoint
        weights)."""
        for t, s in zip(self.teacher.weights, self.segmentor.weights):
            t.assign(s)

    def update_teacher(self):
        """t <- a t + (1 - a) s for every floating-point variable, the trainable weights and
        the BatchNorm moving statistics alike (the teacher predicts in inference mode, so its
        statistics must follow the student's as its weights do); other variables (integer
        states) are copied. a = `ema_decay_at(ema_step)`; then ema_step += 1. Runs in the
        cross-replica context (merge_call), each replica's copy of a mirrored variable
        updated with the same values, as an optimizer's update is."""
        decay = ema_decay_at(self.ema_step, self.ema_decay)
        pairs = [(t, s) for t, s in zip(self.teacher.weights, self.segmentor.weights)]

        def blend(teacher, student, a):
            if teacher.dtype.is_floating:
                return teacher.assign(a * teacher + (1.0 - a) * tf.cast(student, teacher.dtype))
            return teacher.assign(student)

        def update(strategy, a):
            for t, s in pairs:
                strategy.extended.update(_tf_variable(t), blend, args=(_tf_variable(s), a),
                                         group=False)
            strategy.extended.update(_tf_variable(self.ema_step),
                                     lambda v: v.assign_add(tf.constant(1, v.dtype)),
                                     group=False)

        context = tf.distribute.get_replica_context()
        if context is None:  # called in a strategy's cross-replica context
            update(tf.distribute.get_strategy(), decay)
        else:
            context.merge_call(update, args=(decay,))

    def consistency_weight_now(self):
        return self.consistency_weight * sigmoid_rampup(self.ema_step, self.rampup_steps)

    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        n_s = tf.shape(x_s)[0]
        teacher_probs = heads.class_probabilities(
            self.teacher(x_t, training=False)["logits"])
        x_strong, teacher_probs, valid = self.strong_view(x_t, tf.stop_gradient(teacher_probs))
        weight = self.consistency_weight_now()
        with tf.GradientTape() as tape:
            # one student forward for both domains (per-sample normalisation: same as two)
            logits = self.segmentor(tf.concat([x_s, tf.cast(x_strong, x_s.dtype)], 0),
                                    training=True)["logits"]
            seg = self.supervised_loss(y_s, logits[:n_s])
            cons, counted = consistency(self.consistency_kind, logits[n_s:], teacher_probs,
                                        valid, self.threshold)
            loss = (losses.replica_mean(seg) + weight * losses.replica_mean(cons)
                    + losses.replica_mean(self.minent_loss(logits[n_s:])))
        self.apply_update(tape, loss, "seg")
        self.update_teacher()
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        self.cons_loss_tracker.update_state(tf.reduce_mean(cons))
        self.cons_fraction_tracker.update_state(tf.reduce_mean(counted))
        return {m.name: m.result() for m in self.metrics if m is not self.val_dice}


def _tf_variable(variable):
    """The tf.Variable (a distributed one under a strategy) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable
