"""Model selection without target labels: which epoch's segmentor to keep.

Unsupervised domain adaptation has no labelled target data to validate on, so the checkpoint
is chosen by one of (`--select_on`):

* `source_dice` (default): Dice on the labelled source validation split (`val_dice`, from the
  method's test_step). Honest, but blind to how the target domain is doing.
* `target_entropy`: mean normalised prediction entropy on target validation images (lower is
  better): the confidence criterion Morerio et al. (2018, "Minimal-entropy correlation
  alignment for unsupervised deep domain adaptation") propose for validating UDA models, with
  AdvEnt's normalised entropy map (Vu et al. 2019).
* `target_agreement`: mean Dice between the prediction of a target image and the prediction of
  a transformed copy mapped back (flips, or a fixed intensity jitter; higher is better): the
  test-time-augmentation consistency that Wang et al. (2019, "Aleatoric uncertainty estimation
  with test-time augmentation for medical image segmentation") use as an uncertainty estimate.
* `target_teacher_agreement`: for a method with two networks of one architecture (mean
  teacher: its EMA teacher and its student), mean Dice between their predictions on target
  validation images (higher is better). The teacher averages the student over recent steps,
  so the two agree where the student's target predictions have stopped moving, the state
  self-ensembling's consistency term (French et al. 2018) pushes towards. Our own heuristic,
  offered to be measured against the others, not as the default.
* `oracle`: Dice on target validation labels. Reported under the `oracle/` prefix whenever
  labels exist, and used to choose a checkpoint only when asked for by name, since it needs
  exactly the labels UDA assumes are missing (docs/DESIGN.md, "Target labels stay out of
  training").

`TargetCriteria` adds `target_entropy`, `target_agreement`, `target_teacher_agreement` (for a
model with a `paired_network()`) and `oracle/val_dice` (+ per class) to the epoch logs in
`on_epoch_end`; Keras passes one logs dict through the callbacks in list order, so it must
come BEFORE the checkpoint callback that reads them (and before loggers that should record
them). `selection_callbacks` builds the pair in that order.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from uda_tf.losses import entropy_map
from uda_tf.metrics import dice_from_counts
from uda_tf.models.heads import class_probabilities
from uda_tf.training.callbacks import BestSegmentorCheckpoint, networks

SELECT_ON = ("source_dice", "target_entropy", "target_agreement", "target_teacher_agreement",
             "oracle")
_MONITORS = {
    "source_dice": ("val_dice", "max"),
    "target_entropy": ("target_entropy", "min"),
    "target_agreement": ("target_agreement", "max"),
    "target_teacher_agreement": ("target_teacher_agreement", "max"),
    "oracle": ("oracle/val_dice", "max"),
}
TRANSFORMS = ("flip", "jitter")


def selection_monitor(select_on: str) -> tuple[str, str]:
    """(name of the epoch-log value, "max" or "min") that `select_on` keeps the best of."""
    if select_on not in _MONITORS:
        raise ValueError(f"--select_on must be one of {', '.join(SELECT_ON)}, got {select_on!r}")
    return _MONITORS[select_on]


def check_model(select_on: str, model) -> None:
    """--select_on=target_teacher_agreement needs a model with a paired network."""
    if select_on == "target_teacher_agreement" and networks(model)[1] is None:
        name = getattr(model, "name_in_registry", "") or type(model).__name__
        raise ValueError(f"--select_on=target_teacher_agreement compares a teacher's and a "
                         f"student's predictions; --method={name} has no second network "
                         "(use --method=mean_teacher, or another --select_on)")


def _unpack(batch):
    """images, labels or None, per-image label flags or None, from the batch forms of
    uda_tf.data.pipeline.eval_dataset (dicts with metadata, or (images, labels)) or plain
    image batches."""
    if isinstance(batch, dict):
        labels = batch.get("label")
        has = batch.get("has_label")
        return batch["image"], labels, None if has is None else tf.cast(has, tf.bool)
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None), None
    return batch, None, None


def _probabilities(network, images):
    out = network(images, training=False)
    return class_probabilities(out["logits"] if isinstance(out, dict) else out)


def _overlap_counts(pred, other):
    """[3, K]: per class, pixels where both one-hot maps say it, where `pred` does, where
    `other` does (the pooled Dice's counts)."""
    axes = list(range(len(pred.shape) - 1))
    return tf.stack([tf.reduce_sum(pred * other, axes), tf.reduce_sum(pred, axes),
                     tf.reduce_sum(other, axes)])


class TargetCriteria(keras.callbacks.Callback):
    """Label-free selection criteria on target validation images, each epoch.

    dataset_fn: zero-argument callable returning one pass over target validation batches
      (images [N, H, W, C], (images, labels), or eval_dataset's dicts; with dicts,
      `has_label` says which slices carry a label).
    transforms: agreement under "flip" (each axis of `flip_axes`, flipped back) and/or
      "jitter" (x (1 ± scale) ± shift, a fixed pair, so epochs are compared on the same
      perturbation).
    oracle: also compute `oracle/val_dice` (pooled Dice over all labelled pixels, mean over
      foreground classes, as the source `val_dice`) when the batches carry labels.
    steps: batches per epoch (None: the whole pass).
    """

    def __init__(self, dataset_fn, *, class_names=None, transforms=("flip",),
                 flip_axes=(1, 2), jitter_scale=0.1, jitter_shift=0.1, oracle=True,
                 steps=None):
        super().__init__()
        unknown = sorted(set(transforms) - set(TRANSFORMS))
        if unknown or not transforms:
            raise ValueError(f"transforms must be a non-empty subset of {TRANSFORMS}, "
                             f"got {transforms}")
        self.dataset_fn, self.class_names = dataset_fn, class_names
        self.transforms, self.flip_axes = tuple(transforms), tuple(int(a) for a in flip_axes)
        self.jitter = ((1 + jitter_scale, jitter_shift), (1 - jitter_scale, -jitter_shift))
        self.oracle, self.steps = oracle, steps
        self._step_fns = {}

    def _pairs(self, images):
        """(transformed images, function mapping its prediction back) for agreement."""
        pairs = []
        if "flip" in self.transforms:
            for axis in self.flip_axes:
                pairs.append((tf.reverse(images, [axis]),
                              lambda p, axis=axis: tf.reverse(p, [axis])))
        if "jitter" in self.transforms:
            for scale, shift in self.jitter:
                pairs.append((images * scale + shift, lambda p: p))
        return pairs

    def _step_fn(self, segmentor, paired, images):
        """The per-batch criteria as one graph, traced once for any batch size: a single
        forward pass of `segmentor` over the batch stacked with its transformed copies (our
        networks treat samples independently at inference, so this equals one pass per copy,
        with one graph to build instead of several), and `paired`'s on the batch."""
        key = (id(segmentor), id(paired))
        if key in self._step_fns:
            return self._step_fns[key]
        spec = tf.TensorSpec([None, *images.shape[1:]], tf.float32)

        @tf.function(input_signature=[spec])
        def step(images):
            n = tf.shape(images)[0]
            pairs = self._pairs(images)
            stacked = _probabilities(segmentor, tf.concat([images] + [t for t, _ in pairs], 0))
            probs = stacked[:n]
            k = probs.shape[-1]
            pred = tf.one_hot(tf.argmax(probs, -1), k)
            entropy = tf.reduce_sum(entropy_map(probs))
            agreement = []
            for i, (_, back) in enumerate(pairs):
                other = back(stacked[(i + 1) * n:(i + 2) * n])
                agreement.append(_overlap_counts(pred, tf.one_hot(tf.argmax(other, -1), k)))
            pair = (tf.zeros([3, k]) if paired is None else _overlap_counts(
                pred, tf.one_hot(tf.argmax(_probabilities(paired, images), -1), k)))
            return entropy, tf.stack(agreement), pair, pred

        self._step_fns[key] = step
        return step

    def compute(self, segmentor, paired=None) -> dict:
        """The criteria of `segmentor` (a Keras model returning {"logits"} or logits), and
        with `paired` (a second such model) `target_teacher_agreement` between the two."""
        entropy_sum, pixels, agree, oracle, pair = 0.0, 0, None, None, None
        for n, batch in enumerate(self.dataset_fn()):
            if self.steps is not None and n >= self.steps:
                break
            images, labels, has_label = _unpack(batch)
            images = tf.convert_to_tensor(images, tf.float32)
            entropy, agreement, counts, pred = self._step_fn(segmentor, paired, images)(images)
            entropy_sum += float(entropy)
            pixels += int(np.prod(pred.shape[:-1]))
            agree = agreement.numpy() if agree is None else agree + agreement.numpy()
            if paired is not None:
                pair = counts.numpy() if pair is None else pair + counts.numpy()
            if self.oracle and labels is not None:
                true = tf.one_hot(tf.cast(labels, tf.int32), pred.shape[-1])
                if has_label is not None:
                    keep = tf.reshape(tf.cast(has_label, tf.float32),
                                      [-1] + [1] * (len(true.shape) - 1))
                    true, pred = true * keep, pred * keep
                axes = list(range(len(true.shape) - 1))
                counts = np.stack([tf.reduce_sum(pred * true, axes).numpy(),
                                   tf.reduce_sum(pred, axes).numpy(),
                                   tf.reduce_sum(true, axes).numpy()])
                if has_label is None or bool(tf.reduce_any(has_label)):
                    oracle = counts if oracle is None else oracle + counts
        if not pixels:
            raise ValueError("TargetCriteria: the target validation dataset is empty")
        # Dice per class pooled over the set; a class absent from both counts as agreeing.
        dice = dice_from_counts(agree[:, 0], agree[:, 1], agree[:, 2])
        out = {"target_entropy": entropy_sum / pixels,
               "target_agreement": float(dice[:, 1:].mean())}
        if pair is not None:
            out["target_teacher_agreement"] = float(dice_from_counts(*pair)[1:].mean())
        if oracle is not None:
            per_class = dice_from_counts(*oracle)
            out["oracle/val_dice"] = float(per_class[1:].mean())
            for i, name in enumerate(self.class_names or []):
                if i:  # background (class 0) is not reported, as for val_dice
                    out[f"oracle/val_dice_{name}"] = float(per_class[i])
        return out

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update(self.compute(*networks(self.model)))


def selection_callbacks(select_on: str, checkpoint_path: str, *, dataset_fn=None,
                        class_names=None, **criteria_options) -> list:
    """[TargetCriteria (when target validation data is given), BestSegmentorCheckpoint on
    `select_on`'s monitor], in the order Keras must run them."""
    monitor, mode = selection_monitor(select_on)
    if select_on != "source_dice" and dataset_fn is None:
        raise ValueError(f"--select_on={select_on} needs the target validation images "
                         "(dataset_fn)")
    callbacks = []
    if dataset_fn is not None:
        callbacks.append(TargetCriteria(dataset_fn, class_names=class_names,
                                        **criteria_options))
    callbacks.append(BestSegmentorCheckpoint(checkpoint_path, monitor=monitor, mode=mode))
    return callbacks
