"""What every method shares: the segmentor, its supervised loss, and validation on source."""
from __future__ import annotations

import keras
import tensorflow as tf

from uda_tf import losses
from uda_tf.metrics import StreamingDice
from uda_tf.models.heads import parse_class_weights
from uda_tf.methods.schedules import learning_rates_from_flags
from uda_tf import keras_compat


def split_batch(data):
    """Training batches are ((x_s, y_s), x_t) for methods that see target images, (x_s, y_s)
    otherwise. Returns x_s, y_s, x_t (x_t is None when absent)."""
    if isinstance(data[0], (tuple, list)):
        (x_s, y_s), x_t = data
        return x_s, y_s, x_t
    x_s, y_s = data
    return x_s, y_s, None


def check_minent_weight(weight, uses_target: bool, method: str) -> float:
    weight = float(weight)
    if weight < 0:
        raise ValueError(f"--minent_weight must be >= 0, got {weight}")
    if weight > 0 and not uses_target:
        raise ValueError(f"--minent_weight={weight} needs a method that sees target images; "
                         f"{method} does not (use --method=minent for MinEnt alone)")
    return weight
def loss_scaled(optimizer):
    """`optimizer` wrapped in a LossScaleOptimizer when the global dtype policy computes in
    float16 (--mixed_precision on GPU): float16 gradients underflow without loss scaling.
    bfloat16 has float32's exponent range and needs none. Every optimizer a method owns goes
    through this in its `compile`."""
    if (keras.mixed_precision.global_policy().compute_dtype == "float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class SegmentationMethod(keras.Model):
    """Base class. A subclass's `train_step` is its method's update rule; `test_step` (Dice and
    supervised loss on labelled source validation slices) is shared, since checkpoints are
    chosen on source-validation Dice by default and target labels never reach a method."""

    #: whether the training data must include target-domain images
    uses_target = False

    def __init__(self, segmentor: keras.Model, class_names, *, dice_weight: float = 1.0,
                 class_weights=None, minent_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.segmentor = segmentor
        self.class_names = list(class_names)
        self.dice_weight = float(dice_weight)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.minent_weight = check_minent_weight(minent_weight, self.uses_target,
                                                 type(self).__name__)
        self.seg_loss_tracker = keras.metrics.Mean(name="seg_loss")
        self.ent_loss_tracker = keras.metrics.Mean(name="ent_loss")
        self.val_dice = StreamingDice(self.class_names, name="dice")
        # Sub-networks are functional and already built; marking the wrapper built stops Keras
        # from calling it on the (source, target) tuple at fit time (docs/DESIGN.md).
        self.built = True

    # -- construction from resolved flags (one general path for every registered method) --
    @classmethod
    def from_flags(cls, segmentor, class_names, cfg):
        """Build the method around `segmentor` from resolved flag values `cfg`."""
        return cls(segmentor, class_names, **cls.supervised_kwargs(cfg, class_names),
                   **cls.target_kwargs(cfg))

    @staticmethod
    def supervised_kwargs(cfg, class_names) -> dict:
        """The supervised-loss settings every method takes from the flags."""
        return {"dice_weight": cfg.dice_weight,
                "class_weights": parse_class_weights(cfg.class_weights,
                                                     len(class_names))}

    @staticmethod
    def target_kwargs(cfg) -> dict:
        """Target-domain terms every method takes from the flags (subclasses pass them on):
        the MinEnt weight, applied by `minent_loss`."""
        return {"minent_weight": cfg.minent_weight}

    def compile_from_flags(self, cfg):
        seg_lr, _ = learning_rates_from_flags(cfg)
        self.compile(keras.optimizers.Adam(seg_lr), jit_compile=cfg.jit_compile)

    # -- keras plumbing -----------------------------------------------------------------
    def compile(self, seg_optimizer, **kwargs):
        seg_optimizer = loss_scaled(seg_optimizer)
        super().compile(optimizer=seg_optimizer, **kwargs)
        self.seg_optimizer = seg_optimizer

    def all_optimizers(self) -> list:
        """Every optimizer the method holds as an attribute (seg_optimizer, disc_optimizer...)."""
        found = {id(v): v for v in vars(self).values()
                 if isinstance(v, keras.optimizers.Optimizer)}
        return list(found.values())

    def build_optimizers(self):
        """Create optimizer slots now, inside the strategy scope, before `fit` (keras #20164)."""
        self.seg_optimizer.build(self.segmentor.trainable_variables)

    def training_callbacks(self, cfg) -> list:
        """Callbacks the method's update rule needs during fit (e.g. self-training's teacher
        rounds); train.py adds them."""
        return []

    # -- multi-worker fit (keras #20585; the workarounds live in uda_tf/keras_compat.py) ----
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if keras_compat.needs_symbolic_build(self):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function):
        return super()._make_function(
            keras_compat.shaped_step(step_function, self.distribute_strategy))

    def _get_metrics_result_or_logs(self, logs):
        """Keras reports the metrics' own results (their variables, summed over every replica
        and worker when read) only when a step returns exactly `self.metrics`' keys; otherwise
        it keeps the last step's logs, which under a strategy are each replica's *local*
        results averaged over the replicas. `test_step` returns the validation metrics only
        (a GRL also tracks domain_loss, ...), so on several replicas val_dice was the mean of
        per-replica Dice, not the Dice of the validation set. Take the metrics' results for
        the keys the step returned (keras/src/trainers/trainer.py)."""
        metric_logs = self.get_metrics_result()
        if isinstance(logs, dict) and logs and set(logs) <= set(metric_logs):
            return {name: metric_logs[name] for name in logs}
        return super()._get_metrics_result_or_logs(logs)

    def call(self, images, training=False):
        return self.segmentor(images, training=training)["logits"]

    @property
    def metrics(self):
        target = [self.ent_loss_tracker] if self.uses_target else []
        return [self.seg_loss_tracker, self.val_dice] + target

    # -- shared pieces ------------------------------------------------------------------
    @staticmethod
    def optimizer_gradients(tape, loss, *updates):
        """Gradients of `loss` for each `(optimizer, variables)` in `updates`, one list each,
        ready for `optimizer.apply_gradients`. Every train_step gets its gradients here.

        An optimizer that is a LossScaleOptimizer (mixed float16, see `loss_scaled`) gets the
        gradient of `optimizer.scale_loss(loss)`, its own dynamic scale; its `apply_gradients`
        unscales them and skips the step on overflow. Updates whose optimizers do not scale
        share one backward pass. Several backward passes (two loss-scaled optimizers on one
        loss, as GRL's segmentor and domain classifier under float16) need
        `tf.GradientTape(persistent=True)`.

            seg_grads, disc_grads = self.optimizer_gradients(
                tape, loss, (self.seg_optimizer, seg_vars), (self.disc_optimizer, disc_vars))
        """
        grads = [None] * len(updates)
        plain = [i for i, (opt, _) in enumerate(updates)
                 if not isinstance(opt, keras.optimizers.LossScaleOptimizer)]
        if plain:
            flat = tape.gradient(loss, [v for i in plain for v in updates[i][1]])
            for i in plain:
                n = len(updates[i][1])
                grads[i], flat = list(flat[:n]), flat[n:]
        for i, (opt, variables) in enumerate(updates):
            if i not in plain:
                with tape:  # record the scaling, so that the gradient flows through it
                    scaled = opt.scale_loss(loss)
                grads[i] = tape.gradient(scaled, variables)
        return grads

    def supervised_loss(self, labels, logits):
        """Per-sample Dice + CE (loss.py; softmax or sigmoid head, 2D or 3D); reduce with
        losses.replica_mean."""
        return losses.dice_ce_loss(labels, logits, dice_weight=self.dice_weight,
                                   class_weights=self.class_weights)

    def minent_loss(self, target_logits):
        """Per-sample MinEnt term on the target batch, minent_weight x mean normalised entropy
        (Vu et al., CVPR 2019, eq. 3); reduce with losses.replica_mean. Every method that sees
        target images adds it to its segmentor loss, so --minent_weight combines with any of
        them. Logs the unweighted target entropy as `ent_loss` even at weight 0."""
        ent = losses.mean_entropy(target_logits)
        self.ent_loss_tracker.update_state(tf.reduce_mean(ent))
        return self.minent_weight * ent

    def test_step(self, data):
        """(images, labels) or (images, labels, weights): validation batches padded to the
        global batch size (pipeline.eval_dataset(pad_to_batch=True)) carry weight 0 on the
        padding, which then counts in neither the loss nor the Dice."""
        images, labels = data[0], data[1]
        weights = data[2] if len(data) > 2 else None
        logits = self.segmentor(images, training=False)["logits"]
        if weights is None:
            loss = tf.reduce_mean(self.supervised_loss(labels, logits))
            self.seg_loss_tracker.update_state(loss)
        else:  # the mean over the real samples of every replica
            self.seg_loss_tracker.update_state(self.supervised_loss(labels, logits),
                                               sample_weight=weights)
        self.val_dice.update_state(labels, logits, sample_weight=weights)
        return {"seg_loss": self.seg_loss_tracker.result(), **self.val_dice.result()}
