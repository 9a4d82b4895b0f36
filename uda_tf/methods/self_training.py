"""Self-training with confidence-filtered pseudo-labels, in rounds.

A frozen copy of the segmentor (the teacher) labels each target batch; pixels whose prediction
is confident enough (max probability >= threshold, or normalised entropy <= threshold) enter a
cross-entropy term next to the supervised source loss. At the start of every round the teacher
takes the student's current weights, so the pseudo-labels come from the latest model of the
previous round, as in class-balanced self-training (Zou et al., ECCV 2018) and its use for
cross-modality segmentation; computing them on the fly rather than writing them to disk keeps
augmentation and the data pipeline unchanged.

The first round has no teacher worth listening to unless training starts from a trained
segmentor (`--init_checkpoint`, e.g. a source-only run): then pseudo-labels apply from step 0,
otherwise from round 1 on (round 0 is source-only warm-up).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import register
from uda_tf.methods.base import SegmentationMethod, split_batch
from uda_tf.methods.settings import setting
from uda_tf.models import heads

PSEUDO_LABEL_CRITERIA = ("confidence", "entropy")


def pseudo_labels(probs, criterion: str, threshold: float):
    """(labels [N, ...] int32, mask [N, ...] float32) of the pixels that pass the filter:
    max probability >= threshold (`confidence`) or entropy / log C <= threshold (`entropy`)."""
    labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
    if criterion == "confidence":
        keep = tf.reduce_max(probs, axis=-1) >= threshold
    elif criterion == "entropy":
        keep = losses.entropy_map(probs) <= threshold
    else:
        raise ValueError(f"unknown pseudo-label criterion {criterion!r}; expected one of "
                         f"{PSEUDO_LABEL_CRITERIA}")
    return labels, tf.cast(keep, tf.float32)


def masked_cross_entropy(labels, logits, mask):
    """Per-sample mean over ALL pixels of mask x CE: a rejected pixel contributes zero, and the
    normaliser does not depend on how many pixels passed, so the loss is additive over samples
    (replica-invariant) and a batch with few confident pixels gets a small update, not a loud
    one from a handful of pixels."""
    ce = losses.pixel_cross_entropy(labels, logits)  # softmax or sigmoid head, 2D or 3D
    spatial = list(range(1, len(ce.shape)))
    return tf.reduce_mean(ce * mask, axis=spatial)


@register("self_training")
class SelfTraining(SegmentationMethod):
    uses_target = True

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        pseudo_label_criterion: str = setting(
            "confidence", "self_training: which target pixels keep their pseudo-label: max "
            "probability >= --pseudo_label_threshold (confidence) or entropy/log C <= it "
            "(entropy).", choices=PSEUDO_LABEL_CRITERIA)
        pseudo_label_threshold: float = setting(0.9, "self_training: the filter's threshold.",
                                                lower=0, upper=1)
        pseudo_label_weight: float = setting(
            1.0, "self_training: weight of the pseudo-label cross-entropy on target.", lower=0)
        self_training_round_epochs: int = setting(
            1, "self_training: epochs per round; the teacher that makes the pseudo-labels "
            "takes the student's weights at each round.", lower=1)

    def __init__(self, segmentor, class_names, *, teacher: keras.Model, criterion="confidence",
                 threshold=0.9, pseudo_weight=1.0, warmup=True, **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        self.teacher = teacher
        self.teacher.trainable = False
        self.criterion, self.threshold = criterion, float(threshold)
        self.pseudo_weight = float(pseudo_weight)
        # 0 during a warm-up round (no teacher yet), 1 after; set between rounds on the host.
        self.pseudo_active = keras.Variable(0.0 if warmup else 1.0, trainable=False,
                                            name="pseudo_active")
        self.pseudo_loss_tracker = keras.metrics.Mean(name="pseudo_loss")
        self.pseudo_fraction_tracker = keras.metrics.Mean(name="pseudo_fraction")
        self.refresh_teacher()

    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        teacher = keras.models.clone_model(segmentor)
        return cls(segmentor, class_names, **cls.base_kwargs(config, class_names),
                   teacher=teacher, criterion=config.pseudo_label_criterion,
                   threshold=config.pseudo_label_threshold,
                   pseudo_weight=config.pseudo_label_weight, warmup=not run.init_checkpoint)

    def refresh_teacher(self):
        """Teacher <- student (start of a round)."""
        for t, s in zip(self.teacher.weights, self.segmentor.weights):
            t.assign(s)

    def training_callbacks(self):
        return [TeacherRounds(self.config.self_training_round_epochs)]

    @property
    def metrics(self):
        return [*super().metrics, self.pseudo_loss_tracker, self.pseudo_fraction_tracker]

    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        n_s = tf.shape(x_s)[0]
        probs_t = heads.class_probabilities(self.teacher(x_t, training=False)["logits"])
        target_labels, mask = pseudo_labels(tf.stop_gradient(probs_t), self.criterion,
                                            self.threshold)
        with tf.GradientTape() as tape:
            # one student forward for both domains (per-sample normalisation: same as two)
            logits = self.segmentor(tf.concat([x_s, x_t], 0), training=True)["logits"]
            seg = self.supervised_loss(y_s, logits[:n_s])
            pseudo = masked_cross_entropy(target_labels, logits[n_s:], mask)
            weight = self.pseudo_weight * self.pseudo_active
            loss = (losses.replica_mean(seg) + weight * losses.replica_mean(pseudo)
                    + losses.replica_mean(self.minent_loss(logits[n_s:])))
        self.apply_update(tape, loss, "seg")
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        self.pseudo_loss_tracker.update_state(tf.reduce_mean(pseudo))
        self.pseudo_fraction_tracker.update_state(tf.reduce_mean(mask))
        return {m.name: m.result() for m in self.metrics if m is not self.val_dice}


class TeacherRounds(keras.callbacks.Callback):
    """Every `round_epochs` epochs, copy the student into the teacher and switch the
    pseudo-label term on (it stays off during a warm-up first round)."""

    def __init__(self, round_epochs: int):
        super().__init__()
        if round_epochs < 1:
            raise ValueError(f"--self_training_round_epochs must be >= 1, got {round_epochs}")
        self.round_epochs = round_epochs

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0 and epoch % self.round_epochs == 0:
            self.model.refresh_teacher()
            self.model.pseudo_active.assign(1.0)
