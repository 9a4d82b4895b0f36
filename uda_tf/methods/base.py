"""What every method shares: the segmentor, its supervised loss, and validation on source."""
from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from uda_tf import losses
from uda_tf.metrics import StreamingDice
from uda_tf.methods import settings
from uda_tf.methods.settings import setting
from uda_tf.models.heads import parse_class_weights
from uda_tf.methods.schedules import LR_SCHEDULES, learning_rates
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


class SegmentationMethod(keras_compat.FitHooks):
    """Base class. A subclass's `train_step` is its method's update rule; `test_step` (Dice and
    supervised loss on labelled source validation slices) is shared, since checkpoints are
    chosen on source-validation Dice by default and target labels never reach a method.

    A subclass declares its settings in a nested frozen dataclass `Config` (derived from this
    one; every field a `settings.setting`, from which train.py generates the flag), the
    sub-network each of its optimizers trains in `optimizer_targets`, and registers itself
    with `uda_tf.methods.register`."""

    #: whether the training data must include target-domain images
    uses_target = False
    #: the --method name, set by `uda_tf.methods.register`
    name_in_registry = ""

    @dataclasses.dataclass(frozen=True)
    class Config:
        """Settings every method shares: the supervised loss, the MinEnt term added by every
        method that sees target images, and the second learning rate of methods with more
        than one sub-network."""
        dice_weight: float = setting(1.0, "Weight of the soft Dice term in Dice + CE.", lower=0)
        class_weights: tuple | None = setting(
            None, "Per-class weights of the CE and Dice terms, one per class, background first "
            "(e.g. 0.5,1,2); default: all 1.", kind="list")
        minent_weight: float = setting(
            0.0, "Weight of target entropy minimisation (MinEnt, Vu et al. 2019), added by "
            "every method that sees target images; --method=minent needs it > 0.", lower=0)
        disc_learning_rate: float = setting(
            1e-3, "Adam learning rate of the domain classifier.", lower=0)
        disc_lr_schedule: str = setting(
            "same", "Schedule of the domain classifier's learning rate (same: --lr_schedule).",
            choices=("same", *LR_SCHEDULES))

        def check(self):
            """Rules between fields (a ValueError naming the flags); none here."""

    def __init__(self, segmentor: keras.Model, class_names, *, dice_weight: float = 1.0,
                 class_weights=None, minent_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.segmentor = segmentor
        self.class_names = list(class_names)
        self.dice_weight = float(dice_weight)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.minent_weight = check_minent_weight(minent_weight, self.uses_target,
                                                 self._method_name())
        self.seg_loss_tracker = keras.metrics.Mean(name="seg_loss")
        self.ent_loss_tracker = keras.metrics.Mean(name="ent_loss")
        self.val_dice = StreamingDice(self.class_names, name="dice")
        self.optimizers: dict = {}
        self._grad_norm_squares: dict = {}
        # Sub-networks are functional and already built; marking the wrapper built stops Keras
        # from calling it on the (source, target) tuple at fit time (docs/DESIGN.md).
        self.built = True

    @classmethod
    def _method_name(cls) -> str:
        return f"--method={cls.name_in_registry}" if cls.name_in_registry else cls.__name__

    # -- construction from a checked config (one general path for every registered method) --
    @classmethod
    def configure(cls, values: dict):
        """This method's `Config` from flag values (extra keys ignored, missing ones take the
        default), checked once: each setting's allowed values and bounds, the Config's own
        `check()`, and whether the method sees the target images --minent_weight needs. The
        ValueError names the flag."""
        config = settings.from_values(cls.Config, values)
        check_minent_weight(config.minent_weight, cls.uses_target, cls._method_name())
        return config

    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        """Build the method around `segmentor` from its checked `config` (`configure`) and
        `run`, the run's training settings (epochs, steps_per_epoch, seed, init_checkpoint)."""
        return cls(segmentor, class_names, **cls.base_kwargs(config, class_names))

    @classmethod
    def build(cls, segmentor, class_names, config, run):
        """The method as train.py trains it: made from its checked `config` (`from_config`),
        compiled with its default optimizers on the run's learning-rate schedules, every
        optimizer built. `run`: the run's settings (epochs, steps_per_epoch, seed,
        init_checkpoint, learning_rate, lr_schedule, lr_decay, warmup_steps, jit_compile)."""
        model = cls.from_config(segmentor, class_names, config, run)
        model.config = config
        model.compile_from_config(config, run)
        return model

    @staticmethod
    def base_kwargs(config, class_names) -> dict:
        """The constructor arguments every method takes from the shared settings."""
        return {"dice_weight": config.dice_weight,
                "class_weights": parse_class_weights(config.class_weights, len(class_names)),
                "minent_weight": config.minent_weight}

    def default_optimizers(self, seg_lr, disc_lr) -> dict:
        """Adam per optimizer name: the segmentor's at `seg_lr`, every other at `disc_lr`."""
        return {name: keras.optimizers.Adam(seg_lr if name == "seg" else disc_lr)
                for name in self.optimizer_targets()}

    def compile_from_config(self, config, run):
        """`compile` with `default_optimizers` on the run's learning-rate schedules."""
        seg_lr, disc_lr = learning_rates(run, config)
        self.compile(**self.default_optimizers(seg_lr, disc_lr), jit_compile=run.jit_compile)

    # -- optimizers: one dict, built before fit, read by resume, the guard and loss scaling --
    def optimizer_targets(self) -> dict:
        """{optimizer name: the sub-network it trains}; `compile` takes one optimizer per
        name. A method with more sub-networks adds its own."""
        return {"seg": self.segmentor}

    def compile(self, *, jit_compile=False, **optimizers):
        """`compile(seg=Adam(...), disc=Adam(...))`: one optimizer per `optimizer_targets`
        name, each loss-scaled under float16 (`loss_scaled`), kept in `self.optimizers` and
        built at once on its sub-network's variables (keras #20164: slots created inside the
        strategy scope, before fit)."""
        targets = self.optimizer_targets()
        if sorted(optimizers) != sorted(targets):
            raise ValueError(f"{type(self).__name__}.compile needs one optimizer per "
                             f"sub-network {sorted(targets)}, got {sorted(optimizers)}")
        self.optimizers = {name: loss_scaled(optimizers[name]) for name in targets}
        super().compile(optimizer=self.optimizers["seg"], jit_compile=jit_compile)
        # Read by the divergence guard after each step (`gradient_norms`); summed over
        # replicas when assigned (see `_record_norm`).
        self._grad_norm_squares = {
            name: tf.Variable(0.0, trainable=False, name=f"grad_norm_{name}",
                              aggregation=tf.VariableAggregation.SUM)
            for name in targets}
        self.build_optimizers()

    @property
    def seg_optimizer(self):
        return self.optimizers["seg"]

    def all_optimizers(self) -> list:
        return list(self.optimizers.values())

    @staticmethod
    def optimizer_label(name: str) -> str:
        """How backups and logged metrics name optimizer `name` (`seg` -> `seg_optimizer`)."""
        return f"{name}_optimizer"

    def build_optimizers(self):
        """Create every optimizer's slots now, inside the strategy scope, before `fit`
        (keras #20164); `compile` calls it."""
        for name, target in self.optimizer_targets().items():
            self.optimizers[name].build(target.trainable_variables)

    def apply_update(self, tape, loss, *names):
        """One update of the named optimizers on `loss`: each one's gradients for its
        sub-network (`optimizer_gradients`: one backward pass, or one per loss scale),
        applied, and their norm recorded for the divergence guard."""
        targets = self.optimizer_targets()
        updates = [(self.optimizers[n], targets[n].trainable_variables) for n in names]
        grads = self.optimizer_gradients(tape, loss, *updates)
        for name, (opt, variables), g in zip(names, updates, grads):
            self._record_norm(name, opt, g)  # before apply: it may change the loss scale
            opt.apply_gradients(zip(g, variables))

    def _record_norm(self, name, optimizer, grads):
        """Stores this replica's squared gradient norm, summed over the replicas on assignment
        (aggregation SUM). On one device that is the applied gradient's norm; on R replicas
        the applied gradient is sum_r g_r and this is sqrt(sum_r |g_r|^2), the norm of all
        replicas' gradients side by side: finite exactly when every replica's gradient is,
        which is what the divergence guard asks, and without a second all-reduce of the
        gradients. A float16 step that overflows is LossScaleOptimizer's to skip (it lowers
        its scale), not a divergence: its norm is recorded as 0."""
        norm = tf.linalg.global_norm([g for g in grads if g is not None])
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            norm = norm / tf.cast(optimizer.dynamic_scale, norm.dtype)
            norm = tf.where(tf.math.is_finite(norm), norm, tf.zeros_like(norm))
        self._grad_norm_squares[name].assign(tf.cast(tf.square(norm), tf.float32))

    def gradient_norms(self) -> dict[str, float]:
        """{`optimizer_label`: norm of that optimizer's last applied gradients} (see
        `_record_norm`), read by the divergence guard after each step."""
        return {self.optimizer_label(n): math.sqrt(max(float(v.numpy()), 0.0))
                for n, v in self._grad_norm_squares.items()}

    def training_callbacks(self) -> list:
        """Callbacks the method's update rule needs during fit (e.g. self-training's teacher
        rounds, from the `config` it was built with); train.py adds them."""
        return []

    def kept_network(self) -> keras.Model:
        """The network this method validates (`test_step`), checkpoints (the best checkpoint
        of training/callbacks.py), judges by the label-free target criteria and so exports:
        the segmentor, unless a method keeps another network of the same architecture (mean
        teacher's EMA teacher)."""
        return self.segmentor

    @classmethod
    def export_builders(cls, config, input_shape) -> dict:
        """{output name: function building the network} of the networks exported beside the
        segmentor (`exported_networks`), from the method's checked `config` and the
        segmentor's input shape alone: what uda-export rebuilds around a checkpoint before
        loading their saved weights. {} by default."""
        return {}

    def exported_networks(self) -> dict:
        """Image -> image networks exported beside the kept segmentor, in the SavedModel's
        `translate` signature: {output name: the trained network}, rebuilt for export by
        `export_builders`; the checkpoint callback saves their weights beside the kept
        network's, so the export holds those of the kept epoch. None by default (AttENT: its
        two translators)."""
        return {}

    def paired_network(self) -> keras.Model | None:
        """A second network of the kept one's architecture whose target predictions the
        kept network's can be compared with (mean teacher: the student or the teacher, the
        one not kept), or None; read by --select_on=target_teacher_agreement."""
        return None

    def call(self, images, training=False):
        return self.kept_network()(images, training=training)["logits"]

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
                tape, loss, (seg_optimizer, seg_vars), (disc_optimizer, disc_vars))

        `apply_update` calls it for the optimizers a method names.
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
        """Validates `kept_network()` on (images, labels) or (images, labels, weights):
        validation batches padded to the global batch size (pipeline.eval_dataset(
        pad_to_batch=True)) carry weight 0 on the padding, which then counts in neither the
        loss nor the Dice."""
        images, labels = data[0], data[1]
        weights = data[2] if len(data) > 2 else None
        logits = self.kept_network()(images, training=False)["logits"]
        if weights is None:
            loss = tf.reduce_mean(self.supervised_loss(labels, logits))
            self.seg_loss_tracker.update_state(loss)
        else:  # the mean over the real samples of every replica
            self.seg_loss_tracker.update_state(self.supervised_loss(labels, logits),
                                               sample_weight=weights)
        self.val_dice.update_state(labels, logits, sample_weight=weights)
        return {"seg_loss": self.seg_loss_tracker.result(), **self.val_dice.result()}
