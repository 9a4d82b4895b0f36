"""Alternating GAN-style adversarial adaptation with feature-map and entropy-map
discriminators, after entropy-guided UDA (Zeng et al., "Entropy guided unsupervised domain
adaptation for cross-center hip cartilage segmentation from MRI", MICCAI 2020) and AdvEnt (Vu
et al., CVPR 2019).

Each step (the algorithm box of those papers):
  1. every discriminator learns to tell source (label 1) from target (label 0) on detached
     segmentor outputs, --disc_steps times;
  2. the segmentor descends on Dice + CE on source plus lambda_k x the adversarial loss of each
     discriminator with target labels flipped (target presented as source); optionally
     (--adv_both_domains) the feature discriminator also sees source presented as target.
The segmentor runs once per step, on concat(source, target): step 1 reads stop_gradient of
those outputs and step 2 reuses them under the same tape, so a step costs one segmentor
forward and backward on 2B slices plus small discriminator passes.
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
from uda_tf.models.discriminators import entropy_discriminator, feature_discriminator

#: --adv_discriminators values and the discriminators each one trains
DISCRIMINATOR_SETS = {"feature": ("feature",), "entropy": ("entropy",),
                      "both": ("feature", "entropy")}
#: output value above which a discriminator says "source": logits (bce), least-squares outputs
#: (lsgan, targets 0 and 1), critic scores (wgan-gp: only the sign is read, the scale is free)
DECISION_THRESHOLD = {"bce": 0.0, "lsgan": 0.5, "wgan-gp": 0.0}


def entropy_input(logits):
    """The entropy discriminator's input: prediction entropy / log C, [N, *spatial, 1] in
    [0, 1], for a softmax or a sigmoid head (C = 2), 2D or 3D."""
    return losses.entropy_map(heads.class_probabilities(logits))[..., None]


@register("adversarial")
class Adversarial(SegmentationMethod):
    uses_target = True

    @dataclasses.dataclass(frozen=True)
    class Config(SegmentationMethod.Config):
        adv_discriminators: str = setting(
            "both", "adversarial: which discriminators: on the bottleneck features, on the "
            "entropy map, or both.", choices=DISCRIMINATOR_SETS)
        patch_discriminators: bool = setting(
            False, "adversarial: fully convolutional patch discriminators (a logit map) "
            "instead of dense heads.")
        adv_loss: str = setting(
            "bce", "adversarial: GAN loss: bce, least squares (lsgan) or Wasserstein with "
            "gradient penalty (wgan-gp; discriminator Adam betas 0, 0.9).",
            choices=losses.ADVERSARIAL_LOSSES)
        adv_feature_weight: float = setting(
            1e-3, "adversarial: lambda of the feature discriminator's loss in the segmentor "
            "objective.", lower=0)
        adv_entropy_weight: float = setting(
            1e-3, "adversarial: lambda of the entropy discriminator's loss in the segmentor "
            "objective.", lower=0)
        adv_both_domains: bool = setting(
            False, "adversarial: the feature discriminator's segmentor loss also presents "
            "source as target (both domains flipped).")
        disc_steps: int = setting(
            1, "adversarial: discriminator updates per segmentor update (on the same batch).",
            lower=1)
        gp_weight: float = setting(
            10.0, "adversarial: gradient penalty weight for --adv_loss=wgan-gp.", lower=0)

        def check(self):
            if self.adv_both_domains and "feature" not in DISCRIMINATOR_SETS[
                    self.adv_discriminators]:
                raise ValueError("--adv_both_domains applies to the feature discriminator, "
                                 f"which --adv_discriminators={self.adv_discriminators} "
                                 "leaves out")

    def __init__(self, segmentor, class_names, *, discriminators: dict,
                 adv_weights: dict, adv_loss: str = "bce", both_domains: bool = False,
                 disc_steps: int = 1, gp_weight: float = 10.0, seed: int = 0, **kwargs):
        super().__init__(segmentor, class_names, **kwargs)
        self.disc_names = [n for n in ("feature", "entropy") if n in discriminators]
        if not self.disc_names or set(discriminators) - {"feature", "entropy"}:
            raise ValueError(f"discriminators must be some of 'feature', 'entropy'; got "
                             f"{sorted(discriminators)}")
        if both_domains and "feature" not in self.disc_names:
            raise ValueError("--adv_both_domains applies to the feature discriminator, which "
                             f"--adv_discriminators={'+'.join(self.disc_names)} leaves out")
        missing = [n for n in self.disc_names if n not in adv_weights]
        if missing or any(adv_weights[n] < 0 for n in self.disc_names):
            raise ValueError(f"need an adversarial weight >= 0 per discriminator "
                             f"{self.disc_names}, got {adv_weights}")
        # Separate attributes, not a dict, so Keras tracks each sub-network plainly.
        self.feature_disc = discriminators.get("feature")
        self.entropy_disc = discriminators.get("entropy")
        self.adv_weights = {n: float(adv_weights[n]) for n in self.disc_names}
        self.adv_loss_kind = adv_loss
        self.both_domains = bool(both_domains)
        self.disc_steps = int(disc_steps)
        self.gp_weight = float(gp_weight)
        self.seed = int(seed)
        self.trackers = {}
        for n in self.disc_names:
            for what in ("d_loss", "d_acc", "adv_loss"):
                self.trackers[f"{what}_{n}"] = keras.metrics.Mean(name=f"{what}_{n}")
        self.trackers["adv_loss"] = keras.metrics.Mean(name="adv_loss")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, segmentor, class_names, config, run):
        names = DISCRIMINATOR_SETS[config.adv_discriminators]
        patch = config.patch_discriminators
        discs = {}
        if "feature" in names:
            discs["feature"] = feature_discriminator(segmentor.output["features"].shape[1:],
                                                     patch=patch)
        if "entropy" in names:
            discs["entropy"] = entropy_discriminator(
                tuple(segmentor.output["logits"].shape[1:-1]) + (1,), patch=patch)
        return cls(segmentor, class_names, **cls.base_kwargs(config, class_names),
                   discriminators=discs,
                   adv_weights={"feature": config.adv_feature_weight,
                                "entropy": config.adv_entropy_weight},
                   adv_loss=config.adv_loss, both_domains=config.adv_both_domains,
                   disc_steps=config.disc_steps, gp_weight=config.gp_weight, seed=run.seed)

    def default_optimizers(self, seg_lr, disc_lr):
        # WGAN-GP critics train with Adam(beta_1=0, beta_2=0.9) (Gulrajani et al. 2017, alg. 1):
        # momentum lags behind a critic whose target moves every step.
        betas = {"beta_1": 0.0, "beta_2": 0.9} if self.adv_loss_kind == "wgan-gp" else {}
        return {"seg": keras.optimizers.Adam(seg_lr),
                **{f"{n}_disc": keras.optimizers.Adam(disc_lr, **betas)
                   for n in self.disc_names}}

    def optimizer_targets(self):
        return {"seg": self.segmentor, **{f"{n}_disc": self._disc(n) for n in self.disc_names}}

    def _disc(self, name) -> keras.Model:
        return getattr(self, f"{name}_disc")

    def _optimizer(self, name):
        return self.optimizers[f"{name}_disc"]

    @property
    def metrics(self):
        return super().metrics + list(self.trackers.values())

    # -- the update rule --------------------------------------------------------------------
    def disc_inputs(self, out) -> dict:
        """What each discriminator sees, for the whole concat(source, target) batch."""
        inputs = {}
        if "feature" in self.disc_names:
            inputs["feature"] = out["features"]
        if "entropy" in self.disc_names:
            inputs["entropy"] = entropy_input(out["logits"])
        return inputs

    def train_step(self, data):
        x_s, y_s, x_t = split_batch(data)
        n_s = tf.shape(x_s)[0]
        with tf.GradientTape() as tape:
            # The step's only segmentor pass: step 1 reads it detached, step 2 differentiates it.
            out = self.segmentor(tf.concat([x_s, x_t], axis=0), training=True)
            inputs = self.disc_inputs(out)
            with tape.stop_recording():  # step 1 is no part of the segmentor's objective
                self._update_discriminators(inputs, n_s)                 # step 1
            seg = self.supervised_loss(y_s, out["logits"][:n_s])         # step 2
            ent = self.minent_loss(out["logits"][n_s:])
            adv = self._adversarial_loss(inputs, n_s)
            loss = losses.replica_mean(seg) + losses.replica_mean(ent) + adv
        self.apply_update(tape, loss, "seg")
        self.seg_loss_tracker.update_state(tf.reduce_mean(seg))
        logs = {"seg_loss": self.seg_loss_tracker.result(),
                "ent_loss": self.ent_loss_tracker.result()}
        logs.update({k: t.result() for k, t in self.trackers.items()})
        return logs

    def _update_discriminators(self, inputs, n_s):
        """Step 1: each discriminator descends on its loss with source = 1, target = 0, on
        detached inputs (no gradient reaches the segmentor)."""
        for name in self.disc_names:
            disc = self._disc(name)
            x = tf.stop_gradient(inputs[name])
            for k in range(self.disc_steps):  # unrolled: a handful of steps at most
                with tf.GradientTape() as tape:
                    scores = disc(x, training=True)
                    d_s = losses.adversarial_loss(scores[:n_s], 1.0, self.adv_loss_kind)
                    d_t = losses.adversarial_loss(scores[n_s:], 0.0, self.adv_loss_kind)
                    d_loss = losses.replica_mean(d_s) + losses.replica_mean(d_t)
                    logged = tf.reduce_mean(d_s) + tf.reduce_mean(d_t)
                    if self.adv_loss_kind == "wgan-gp":
                        gp = losses.gradient_penalty(disc, x[:n_s], x[n_s:],
                                                     self._epsilon(name, k, n_s))
                        d_loss += self.gp_weight * losses.replica_mean(gp)
                        logged += self.gp_weight * tf.reduce_mean(gp)
                self.apply_update(tape, d_loss, f"{name}_disc")
            self.trackers[f"d_loss_{name}"].update_state(logged)
            self.trackers[f"d_acc_{name}"].update_state(self._accuracy(scores, n_s))

    def _adversarial_loss(self, inputs, n_s):
        """Step 2's adversarial part, replica-scaled: lambda_k x the loss of discriminator k
        with flipped labels, so the segmentor is rewarded for fooling it."""
        total = 0.0
        logged_total = 0.0
        for name in self.disc_names:
            disc = self._disc(name)
            both = self.both_domains and name == "feature"
            # Source outputs go through the discriminator only when their flipped loss is used.
            scores = disc(inputs[name] if both else inputs[name][n_s:], training=True)
            target_scores = scores[n_s:] if both else scores
            adv_t = losses.adversarial_loss(target_scores, 1.0, self.adv_loss_kind)
            adv = losses.replica_mean(adv_t)
            logged = tf.reduce_mean(adv_t)
            if both:
                adv_s = losses.adversarial_loss(scores[:n_s], 0.0, self.adv_loss_kind)
                adv += losses.replica_mean(adv_s)
                logged += tf.reduce_mean(adv_s)
            total += self.adv_weights[name] * adv
            logged_total += self.adv_weights[name] * logged
            self.trackers[f"adv_loss_{name}"].update_state(logged)
        self.trackers["adv_loss"].update_state(logged_total)
        return total

    def _accuracy(self, scores, n_s):
        """Share of samples on the correct side of the decision threshold (patch maps are
        averaged per sample first)."""
        per_sample = tf.reduce_mean(tf.reshape(scores, [tf.shape(scores)[0], -1]), axis=1)
        says_source = per_sample > DECISION_THRESHOLD[self.adv_loss_kind]
        is_source = tf.range(tf.shape(scores)[0]) < n_s
        return tf.reduce_mean(tf.cast(tf.equal(says_source, is_source), tf.float32))

    def _epsilon(self, name, k, n):
        """Interpolation weights of the gradient penalty, drawn for the global batch from the
        step counter and sliced per replica, so N replicas draw what one device draws."""
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
        salt = (2 * self.seed + self.disc_names.index(name)) * 1000 + k
        seed = tf.stack([tf.constant(salt, tf.int64),
                         tf.cast(self.seg_optimizer.iterations, tf.int64)])
        eps = tf.random.stateless_uniform([n * replicas], seed=seed)
        return eps[replica * n:(replica + 1) * n]
