"""Pixel-level adaptation: AttENT, attention-gated CycleGAN translation plus adversarial
entropy alignment, with a joint or a staged schedule.

Networks and their optimizers (one each, `optimizer_targets`):
  g_st, g_ts  translators source -> target and target -> source (uda_tf.models.translators:
              encoder-decoder, instance norm, attention gates on the skips unless
              --attention_gates=false, which gives a plain U-Net CycleGAN);
  d_s, d_t    PatchGAN image discriminators of each domain;
  seg         the segmentor (what is validated, checkpointed and exported);
  ent_disc    the entropy-map discriminator (AdvEnt's fully convolutional one).

A step has two parts; the schedule decides which run (`phase`, set per epoch by `PhaseSwitch`):
  translate: the translators descend on the adversarial loss of both image discriminators
             (fakes presented as real) + cycle_weight x L1 cycle loss + identity_weight x L1
             identity loss (Zhu et al., "Unpaired image-to-image translation using
             cycle-consistent adversarial networks", ICCV 2017); then the image discriminators
             learn real (1) vs fake (0), the fakes drawn from a pool of earlier fakes (Shrivastava
             et al., CVPR 2017; CycleGAN's 50-image pool) so that they do not chase the newest
             translator alone;
  segment:   the segmentor descends on Dice + CE on the source images and on their translation
             G_st(x_s) (detached: the translators do not learn from the segmentor), plus the
             flipped-label adversarial loss of the entropy discriminator on target predictions;
             the entropy discriminator first learns to tell the entropy maps of translated-source
             predictions (1) from those of target predictions (0), on detached maps. This is
             AttENT's entropy alignment (Li et al., "AttENT: Domain-adaptive medical image
             segmentation via attention-aware translation and adversarial entropy
             minimization", BIBM 2021), after AdvEnt (Vu et al., CVPR 2019).
Schedules: --translation_epochs of translation alone first, then `joint` (both parts every step)
or `staged` (segmentation alone, on frozen translators), the crossMoDA winners' order: translate
first, then train the segmentor on translated images. Self-training on target after that is a
second run (configs/attent_demo.cfg says how).

Losses are per sample and reduced with `losses.replica_mean`; every network normalises per
sample (instance norm), so a global batch split over replicas updates the weights as one device
does. The fake pool is per replica (each keeps `fake_pool_size` of its own fakes), as each
process of a data-parallel PyTorch CycleGAN does; its draws are seeded by step and replica.
"""
from __future__ import annotations

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

from uda_tf import losses
from uda_tf.methods import register
from uda_tf.methods.adversarial import DECISION_THRESHOLD, entropy_input
from uda_tf.methods.base import SegmentationMethod, split_batch
from uda_tf.methods.settings import setting
from uda_tf.models.discriminators import entropy_discriminator
from uda_tf.models.translators import patch_discriminator, translator

SCHEDULES = ("joint", "staged")
GAN_LOSSES = ("lsgan", "bce")
PHASES = ("translate", "segment", "joint")
TRANSLATORS = ("g_st", "g_ts")
IMAGE_DISCS = ("d_s", "d_t")


def phase_at(epoch: int, schedule: str, translation_epochs: int) -> str:
    """The part of the step that runs in `epoch` (0-based): translation alone for the first
    `translation_epochs`, then both (joint) or segmentation alone (staged)."""
    if epoch < translation_epochs:
        return "translate"
    return "joint" if schedule == "joint" else "segment"


class FakePool(keras.layers.Layer):
    """A replica's pool of `size` earlier fakes (CycleGAN's image buffer, Zhu et al. 2017).

    `query(fakes, seed)` returns one image per fake: while the pool fills, the fake itself (and
    it is stored); once full, with probability 1/2 a stored fake drawn at random, which the new
    one replaces, else the new fake. `size` 0 returns the fakes. The images and the fill count
    are variables synchronised on read (one copy per replica; a backup keeps the first
    replica's), so a resumed run continues with the pool it had."""

    def __init__(self, size: int, shape, name="fake_pool", **kwargs):
        super().__init__(name=name, **kwargs)
        self.size = int(size)
        self.image_shape = tuple(int(n) for n in shape)
        if self.size > 0:
            sync = {"synchronization": "on_read", "aggregation": "only_first_replica",
                    "trainable": False}
            self.images = keras.Variable("zeros", shape=(self.size, *self.image_shape),
                                         dtype="float32", name="images", **sync)
            self.count = keras.Variable("zeros", shape=(), dtype="int32", name="count", **sync)
        self.built = True  # its state is made here; nothing to build from an input

    def query(self, fakes, seed):
        """`fakes` [n, *shape]; `seed` a stateless seed [2] (int). Returns [n, *shape]."""
        fakes = tf.cast(fakes, tf.float32)
        if self.size == 0:
            return fakes
        n = tf.shape(fakes)[0]
        index = self.count + tf.range(n)
        filling = index < self.size
        u = tf.random.stateless_uniform([n], seed=seed)
        slot_draw = tf.random.stateless_uniform([n], seed=seed + 1, maxval=self.size,
                                                dtype=tf.int32)
        swap = tf.logical_and(tf.logical_not(filling), u < 0.5)
        slots = tf.where(filling, index, slot_draw)
        stored = tf.gather(self.images, tf.minimum(slots, self.size - 1))
        mask = tf.reshape(swap, [-1] + [1] * len(self.image_shape))
        out = tf.where(mask, stored, fakes)
        write = tf.logical_or(filling, swap)
        where = tf.boolean_mask(slots, write)[:, None]
        self.images.assign(tf.tensor_scatter_nd_update(self.images, where,
                                                       tf.boolean_mask(fakes, write)))
        self.count.assign(tf.minimum(self.count + n, self.size))
        return out


@register("attent")
class AttENT(SegmentationMethod):
    uses_target = True

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        attent_schedule: str = setting(
            "joint", "attent: after --translation_epochs, joint (translators, discriminators "
            "and segmentor every step) or staged (segmentor and entropy discriminator only, "
            "on frozen translators).", choices=SCHEDULES)
        translation_epochs: int = setting(
            2, "attent: first epochs that train the translation alone (the segmentor waits).",
            lower=0)
        attention_gates: bool = setting(
            True, "attent: attention gates on the translators' skip paths (false: a plain "
            "CycleGAN translator).")
        translator_filters: int = setting(
            16, "attent: filters of the translators' first level (doubling per level).",
            lower=1)
        translator_depth: int = setting(
            2, "attent: stride-2 levels of the translators.", lower=1)
        translator_learning_rate: float = setting(
            2e-4, "attent: Adam learning rate (beta_1 0.5, as CycleGAN) of the translators and "
            "the image discriminators.", lower=0)
        translation_gan_loss: str = setting(
            "lsgan", "attent: adversarial loss of the image discriminators (least squares, "
            "as CycleGAN, or bce).", choices=GAN_LOSSES)
        cycle_weight: float = setting(
            10.0, "attent: weight of the L1 cycle-consistency loss.", lower=0)
        identity_weight: float = setting(
            5.0, "attent: weight of the L1 identity loss (G_st(x_t) ~ x_t, G_ts(x_s) ~ x_s).",
            lower=0)
        fake_pool_size: int = setting(
            50, "attent: earlier fakes kept per replica for the image discriminators (0: "
            "none).", lower=0)
        translated_seg_weight: float = setting(
            1.0, "attent: weight of the supervised loss on translated source images (the loss "
            "on the source images themselves has weight 1).", lower=0)
        attent_entropy_weight: float = setting(
            1e-3, "attent: weight of the entropy discriminator's flipped-label loss in the "
            "segmentor objective.", lower=0)
        translation_fidelity_subjects: int = setting(
            0, "attent: new phantom subjects (never trained on) whose source -> target "
            "translation is compared each epoch with the same anatomy rendered by the target "
            "scanner: translation/mae, translation/ssim, translation/tissue_contrast_error "
            "(and the untranslated images' values as translation/untranslated_*). Built-in "
            "phantom domains and 2D only.", lower=0)

    def __init__(self, segmentor, class_names, *, translators: dict, image_discs: dict,
                 entropy_disc: keras.Model, schedule: str = "joint", translation_epochs: int = 0,
                 gan_loss: str = "lsgan", cycle_weight: float = 10.0,
                 identity_weight: float = 5.0, fake_pool_size: int = 50,
                 translated_seg_weight: float = 1.0, entropy_weight: float = 1e-3,
                 translator_learning_rate: float = 2e-4, translator_settings=None,
                 seed: int = 0, **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        if schedule not in SCHEDULES or gan_loss not in GAN_LOSSES:
            raise ValueError(f"schedule {schedule!r} / gan_loss {gan_loss!r}: expected one of "
                             f"{SCHEDULES} / {GAN_LOSSES}")
        self.g_st, self.g_ts = translators["g_st"], translators["g_ts"]
        self.d_s, self.d_t = image_discs["d_s"], image_discs["d_t"]
        self.ent_disc = entropy_disc
        self.schedule, self.translation_epochs = schedule, int(translation_epochs)
        self.gan_loss = gan_loss
        self.cycle_weight, self.identity_weight = float(cycle_weight), float(identity_weight)
        self.translated_seg_weight = float(translated_seg_weight)
        self.entropy_weight = float(entropy_weight)
        self.translator_learning_rate = float(translator_learning_rate)
        self.seed = int(seed)
        # translator()'s keyword arguments the translators were built with (rebuilt for export)
        self.translator_settings = dict(translator_settings or {})
        shape = tuple(segmentor.input_shape[1:])
        self.pool_t = FakePool(fake_pool_size, shape, name="pool_t")
        self.pool_s = FakePool(fake_pool_size, shape, name="pool_s")
        self.phase = phase_at(0, schedule, self.translation_epochs)
        self.fidelity = None  # a TranslationFidelity callback, set by from_config
        names = ("g_loss", "g_adv", "cycle_loss", "identity_loss", "d_img_loss", "d_img_acc",
                 "d_ent_loss", "adv_ent_loss", "translated_seg_loss")
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        shape = tuple(segmentor.input_shape[1:])
        keras.utils.set_random_seed(run.seed)  # the new networks' initial weights
        settings = cls.translator_settings_of(config)
        translators = {n: translator(shape, name=n, **settings) for n in TRANSLATORS}
        discs = {n: patch_discriminator(shape, name=n) for n in IMAGE_DISCS}
        ent = entropy_discriminator(tuple(segmentor.output["logits"].shape[1:-1]) + (1,),
                                    patch=True, name="ent_disc")
        fidelity = None
        if config.translation_fidelity_subjects:
            fidelity = TranslationFidelity.for_run(run, config.translation_fidelity_subjects,
                                                   len(shape) == 4)
        model = cls(segmentor, class_names, **cls.base_kwargs(config, class_names),
                    translators=translators, image_discs=discs, entropy_disc=ent,
                    schedule=config.attent_schedule,
                    translation_epochs=config.translation_epochs,
                    gan_loss=config.translation_gan_loss, cycle_weight=config.cycle_weight,
                    identity_weight=config.identity_weight,
                    fake_pool_size=config.fake_pool_size,
                    translated_seg_weight=config.translated_seg_weight,
                    entropy_weight=config.attent_entropy_weight,
                    translator_learning_rate=config.translator_learning_rate,
                    translator_settings=settings, seed=run.seed)
        model.fidelity = fidelity
        return model

    def optimizer_targets(self):
        return {"seg": self.segmentor, "ent_disc": self.ent_disc,
                **{n: getattr(self, n) for n in TRANSLATORS + IMAGE_DISCS}}

    def default_optimizers(self, seg_lr, disc_lr):
        """Adam for the segmentor (seg_lr) and the entropy discriminator (disc_lr); Adam(
        --translator_learning_rate, beta_1 0.5) for the translators and image discriminators,
        CycleGAN's setting."""
        gan = {n: keras.optimizers.Adam(self.translator_learning_rate, beta_1=0.5)
               for n in TRANSLATORS + IMAGE_DISCS}
        return {"seg": keras.optimizers.Adam(seg_lr),
                "ent_disc": keras.optimizers.Adam(disc_lr), **gan}

    def training_callbacks(self):
        return [PhaseSwitch(), *([self.fidelity] if self.fidelity is not None else [])]

    #: output of the `translate` signature: the translator giving it
    EXPORTED = {"to_target": "g_st", "to_source": "g_ts"}

    @staticmethod
    def translator_settings_of(config) -> dict:
        return {"filters": config.translator_filters, "depth": config.translator_depth,
                "attention": config.attention_gates}

    @classmethod
    def export_builders(cls, config, input_shape) -> dict:
        settings = cls.translator_settings_of(config)
        return {out: functools.partial(translator, tuple(input_shape), name=net, **settings)
                for out, net in cls.EXPORTED.items()}

    def exported_networks(self) -> dict:
        """Image -> image networks exported beside the segmentor in a `translate` signature
        (uda_tf.serving.export): {output name: trained translator}."""
        return {out: getattr(self, net) for out, net in self.EXPORTED.items()}

    @property
    def metrics(self):
        return super().metrics + list(self.trackers.values())

    def set_phase(self, epoch: int) -> bool:
        """Sets the phase of `epoch`; True when it changed (the train function must be
        traced again)."""
        phase = phase_at(epoch, self.schedule, self.translation_epochs)
        changed = phase != self.phase
        self.phase = phase
        return changed

    # -- the update rule ----------------------------------------------------------------------
    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        if self.phase in ("translate", "joint"):
            fake_t = self.translation_step(x_s, x_t)
        else:
            fake_t = self.g_st(x_s, training=False)
        if self.phase in ("segment", "joint"):
            self.segmentation_step(x_s, y_s, tf.stop_gradient(fake_t), x_t)
        return {m.name: m.result() for m in self.metrics if m is not self.val_dice}

    def _gan(self, outputs, label):
        return losses.adversarial_loss(outputs, label, self.gan_loss)

    def _pool_seed(self, which: int):
        ctx = tf.distribute.get_replica_context()
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int64) if ctx else tf.constant(
            0, tf.int64)
        step = tf.cast(self.optimizers["g_st"].iterations, tf.int64)
        return tf.stack([tf.constant(self.seed * 7919 + which, tf.int64) + 1000003 * replica,
                         step])

    def translation_step(self, x_s, x_t):
        """Translators, then image discriminators. Returns G_st(x_s) as trained on."""
        x_s, x_t = tf.cast(x_s, tf.float32), tf.cast(x_t, tf.float32)
        n_s = tf.shape(x_s)[0]
        n_t = tf.shape(x_t)[0]
        with tf.GradientTape() as tape:
            if self.identity_weight > 0:
                # One pass per translator: the other domain's translation and its own
                # domain's identity (instance norm: the samples do not interact).
                st = self.g_st(tf.concat([x_s, x_t], 0), training=True)
                ts = self.g_ts(tf.concat([x_t, x_s], 0), training=True)
                fake_t, fake_s = st[:n_s], ts[:n_t]
                idt = _l1(st[n_s:], x_t), _l1(ts[n_t:], x_s)
            else:  # no identity term: a third of the translators' work saved
                fake_t, fake_s = self.g_st(x_s, training=True), self.g_ts(x_t, training=True)
                idt = tf.zeros([n_t]), tf.zeros([n_s])
            rec_s = self.g_ts(fake_t, training=True)
            rec_t = self.g_st(fake_s, training=True)
            adv_t = self._gan(self.d_t(fake_t, training=True), 1.0)
            adv_s = self._gan(self.d_s(fake_s, training=True), 1.0)
            cyc_s, cyc_t = _l1(rec_s, x_s), _l1(rec_t, x_t)
            g_loss = (losses.replica_mean(adv_t) + losses.replica_mean(adv_s)
                      + self.cycle_weight * (losses.replica_mean(cyc_s)
                                             + losses.replica_mean(cyc_t))
                      + self.identity_weight * (losses.replica_mean(idt[0])
                                                + losses.replica_mean(idt[1])))
        self.apply_update(tape, g_loss, *TRANSLATORS)
        pooled_t = self.pool_t.query(tf.stop_gradient(fake_t), self._pool_seed(0))
        pooled_s = self.pool_s.query(tf.stop_gradient(fake_s), self._pool_seed(2))
        with tf.GradientTape() as tape:
            real_t, pf_t = self.d_t(x_t, training=True), self.d_t(pooled_t, training=True)
            real_s, pf_s = self.d_s(x_s, training=True), self.d_s(pooled_s, training=True)
            d_t = self._gan(real_t, 1.0), self._gan(pf_t, 0.0)
            d_s = self._gan(real_s, 1.0), self._gan(pf_s, 0.0)
            # CycleGAN halves the discriminator's objective to slow it relative to G.
            d_loss = 0.5 * tf.add_n([losses.replica_mean(v) for v in (*d_t, *d_s)])
        self.apply_update(tape, d_loss, *IMAGE_DISCS)
        t = self.trackers
        g_adv = tf.reduce_mean(adv_t) + tf.reduce_mean(adv_s)
        cycle = tf.reduce_mean(cyc_s) + tf.reduce_mean(cyc_t)
        identity = tf.reduce_mean(idt[0]) + tf.reduce_mean(idt[1])
        t["g_adv"].update_state(g_adv)
        t["cycle_loss"].update_state(cycle)
        t["identity_loss"].update_state(identity)
        t["g_loss"].update_state(g_adv + self.cycle_weight * cycle
                                 + self.identity_weight * identity)
        t["d_img_loss"].update_state(0.5 * tf.add_n([tf.reduce_mean(v) for v in (*d_t, *d_s)]))
        threshold = DECISION_THRESHOLD[self.gan_loss]
        correct = [_said(real_t, threshold), 1.0 - _said(pf_t, threshold),
                   _said(real_s, threshold), 1.0 - _said(pf_s, threshold)]
        t["d_img_acc"].update_state(tf.reduce_mean(tf.concat(correct, 0)))
        return fake_t

    def segmentation_step(self, x_s, y_s, fake_t, x_t):
        """Entropy discriminator, then the segmentor, from one segmentor pass over
        concat(x_s, G_st(x_s), x_t)."""
        n_s = tf.shape(x_s)[0]
        with tf.GradientTape() as tape:
            inputs = tf.concat([x_s, tf.cast(fake_t, x_s.dtype), tf.cast(x_t, x_s.dtype)], 0)
            logits = self.segmentor(inputs, training=True)["logits"]
            ent = entropy_input(logits)
            with tape.stop_recording():
                self._update_entropy_disc(tf.stop_gradient(ent[n_s:2 * n_s]),
                                          tf.stop_gradient(ent[2 * n_s:]))
            seg = self.supervised_loss(y_s, logits[:n_s])
            seg_tr = self.supervised_loss(y_s, logits[n_s:2 * n_s])
            adv = self._gan_ent(self.ent_disc(ent[2 * n_s:], training=True), 1.0)
            loss = (losses.replica_mean(seg)
                    + self.translated_seg_weight * losses.replica_mean(seg_tr)
                    + self.entropy_weight * losses.replica_mean(adv)
                    + losses.replica_mean(self.minent_loss(logits[2 * n_s:])))
        self.apply_update(tape, loss, "seg")
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        self.trackers["translated_seg_loss"].update_state(tf.reduce_mean(seg_tr))
        self.trackers["adv_ent_loss"].update_state(tf.reduce_mean(adv))

    def _gan_ent(self, outputs, label):
        return losses.adversarial_loss(outputs, label, "bce")

    def _update_entropy_disc(self, ent_translated, ent_target):
        with tf.GradientTape() as tape:
            d = (self._gan_ent(self.ent_disc(ent_translated, training=True), 1.0),
                 self._gan_ent(self.ent_disc(ent_target, training=True), 0.0))
            d_loss = losses.replica_mean(d[0]) + losses.replica_mean(d[1])
        self.apply_update(tape, d_loss, "ent_disc")
        self.trackers["d_ent_loss"].update_state(tf.reduce_mean(d[0]) + tf.reduce_mean(d[1]))


def _l1(a, b):
    """Per-sample mean absolute difference."""
    diff = tf.abs(tf.cast(a, tf.float32) - tf.cast(b, tf.float32))
    return tf.reduce_mean(tf.reshape(diff, [tf.shape(diff)[0], -1]), axis=1)


def _said(outputs, threshold):
    """Per sample, 1.0 where the discriminator's mean output says "real"."""
    mean = tf.reduce_mean(tf.reshape(tf.cast(outputs, tf.float32), [tf.shape(outputs)[0], -1]),
                          axis=1)
    return tf.cast(mean > threshold, tf.float32)


class PhaseSwitch(keras.callbacks.Callback):
    """Sets the method's phase at the start of each epoch from the epoch number (so a resumed
    run is in the phase its epoch says) and traces the training step again when it changes."""

    def on_epoch_begin(self, epoch, logs=None):
        if self.model.set_phase(epoch):
            self.model.make_train_function(force=True)


class TranslationFidelity(keras.callbacks.Callback):
    """Each epoch, G_st's translation of `pairs.source` (uda_tf.data.paired) against the true
    target-scanner rendering of the same anatomy: uda_tf.metrics.translation_fidelity, added to
    the epoch's logs as translation/<name> (so the epoch logger sends them to MLflow), with the
    untranslated images' values alongside for scale."""

    #: phantom subject indices of the measurement start here: far from any dataset's cases
    FIRST_INDEX = 1000

    #: slices of the pairs drawn in the epoch's image panels
    PANEL_ROWS = 3

    def __init__(self, pairs, label_names: dict, batch_size: int = 16):
        super().__init__()
        self.pairs, self.label_names, self.batch_size = pairs, label_names, batch_size
        n = len(pairs.source)
        # evenly inside the (middle) slices the pairs hold, ends left out
        self.panel_slices = np.unique(np.round(
            np.linspace(0, n - 1, self.PANEL_ROWS + 2)[1:-1]).astype(int)) if n else []
        self.newest_panel = None
        from uda_tf.metrics import translation_fidelity
        self._score = translation_fidelity
        base = translation_fidelity(pairs.source, pairs.reference, pairs.labels, label_names)
        self.untranslated = {f"translation/untranslated_{k}": v for k, v in base.items()
                             if k != "tissues"}

    @classmethod
    def for_run(cls, run, subjects: int, volumes: bool, max_slices: int = 24):
        """From the run's settings: its source/target phantom domains, its data's
        preprocessing, its seed; ValueError naming the flag for data it cannot pair."""
        from uda_tf.data.manifest import load_manifest
        from uda_tf.data.paired import check_phantom_domains, paired_slices
        flag = "--translation_fidelity_subjects"
        check_phantom_domains(run.source_domain, run.target_domain, flag)
        if volumes:
            raise ValueError(f"{flag}: measured on 2D slices only; this run trains on 3D "
                             "patches (set it to 0)")
        manifest = load_manifest(run.data_dir)
        names = {int(k): v for k, v in manifest.label_names.items()}
        pairs = paired_slices(run.source_domain, run.target_domain,
                              range(cls.FIRST_INDEX, cls.FIRST_INDEX + subjects),
                              manifest.preprocessing, seed=run.seed, max_slices=max_slices)
        return cls(pairs, names)

    def measure(self, translate) -> dict:
        """translation_fidelity of `translate` (images -> images) on the pairs."""
        out = np.concatenate([np.asarray(translate(self.pairs.source[i:i + self.batch_size]))
                              for i in range(0, len(self.pairs.source), self.batch_size)])
        return self._score(out, self.pairs.reference, self.pairs.labels, self.label_names)

    def image_panels(self, model) -> dict:
        """The epoch's picture of the translation, {column: [rows, H, W, 1]}: the source
        slices, G_st's translation, G_ts's reconstruction of it, the true target-scanner
        rendering, and the segmentor's normalised entropy on that rendering (a target-domain
        image: where the segmentor is unsure of the target, what the entropy discriminator
        sees)."""
        x = self.pairs.source[self.panel_slices]
        reference = self.pairs.reference[self.panel_slices]
        translated = model.g_st(x, training=False)
        logits = model.segmentor(reference, training=False)["logits"]
        return {"source": x, "translated": np.asarray(translated),
                "reconstructed": np.asarray(model.g_ts(translated, training=False)),
                "true target rendering": reference,
                "entropy on the rendering": np.asarray(entropy_input(logits))}

    def epoch_figures(self):
        """(name, title, {column: images}, colour-map columns) of the newest epoch's panels,
        for train.py to draw (uda_tf.evaluation.figures.image_grid) as plots/<name>.png and
        log to MLflow; None before the first epoch. The panels are computed here, when asked
        (by the chief's EpochFigures, right after this callback's on_epoch_end), so that
        workers that draw nothing spend nothing on them."""
        if self.newest_panel is None:
            return None
        name, title = self.newest_panel
        return name, title, self.image_panels(self.model), ("entropy on the rendering",)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        scores = self.measure(lambda x: self.model.g_st(x, training=False))
        logs.update({f"translation/{k}": v for k, v in scores.items() if k != "tissues"})
        logs.update(self.untranslated)
        if len(self.panel_slices):
            title = (f"translation, epoch {epoch + 1}: tissue contrast error "
                     f"{scores['tissue_contrast_error']:.3f} (untranslated "
                     f"{self.untranslated['translation/untranslated_tissue_contrast_error']:.3f})")
            self.newest_panel = (f"translation/epoch_{epoch:03d}", title)
