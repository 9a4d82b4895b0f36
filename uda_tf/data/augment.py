"""Augmentation as TF ops on batches (NHWC / NDHWC images, NHW / NDHW labels), usable eagerly,
inside tf.data, and on an accelerator.

Ops are registered by name (big_vision's preprocessing-op registry) with a per-sample
probability and parameters; `build(names, **params)` returns one callable for the chosen set:

    aug = augment.build("full", rotation_degrees=10, p_noise=0.2)
    images, labels = aug(images, labels)     # labelled batch
    images = aug(images)                     # unlabelled batch

Spatial ops run first, then intensity ops, in registry order. Rotation, scaling and elastic
deformation are one resampling pass; when one of them is chosen, the flips are folded into the
same pass as a mirroring of the affine part (a mirrored-only sample maps voxel centres onto
voxel centres, so it is exact), instead of separate reversals of the whole batch. Every op draws one Bernoulli(p) per sample, the
batch-level, vectorised form of nnU-Net's per-sample augmentation probabilities (Isensee et al.
2021), whose ranges are the defaults here. How the chosen samples are changed depends on the
op's cost (measured per op by benchmarks/data_pipeline.py): expensive ops (the resampling
step, noise, whose random numbers dominate, blur, bias field, gamma) are computed on the chosen
samples only (gathered, transformed, scattered back), so at p = 0.2 they cost about a fifth
plus the copies; cheap ones (flips, brightness, contrast, jitter) run over the whole batch with
identity parameters for the other samples, which is cheaper than those copies. Ops are skipped
outright when no sample in the batch is chosen.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from uda_tf.data import augment_intensity as intensity
from uda_tf.data import augment_spatial as spatial


@dataclasses.dataclass(frozen=True)
class AugOp:
    name: str
    kind: str  # "spatial" or "intensity"
    probability: float  # default per-sample probability; `p_<name>` overrides it
    params: dict  # parameter defaults, by the names `build` takes
    fn: object = None  # intensity ops: fn(images, active=None, **params)
    subset: bool = False  # without XLA: compute on the chosen samples only (module docstring)
    xla: bool = True  # False: kept out of the XLA-compiled chain (run last, on a subset)


OPS: dict[str, AugOp] = {}


def register_op(name: str, kind: str, probability: float, fn=None, *, subset=False, xla=True,
                **params) -> None:
    if name in OPS:
        raise ValueError(f"augmentation {name!r} is already registered")
    OPS[name] = AugOp(name, kind, probability, params, fn, subset, xla)


register_op("flip", "spatial", 0.5, flip_axes=None)  # None: every spatial axis, each p
register_op("rotation", "spatial", 0.2, rotation_degrees=15.0)
register_op("scaling", "spatial", 0.2, scale_range=(0.85, 1.25))
register_op("elastic", "spatial", 0.2, elastic_alpha=4.0, elastic_grid=5)
register_op("gamma", "intensity", 0.3, intensity.gamma, subset=True, gamma_range=(0.7, 1.5))
register_op("contrast", "intensity", 0.15, intensity.contrast, contrast_range=(0.75, 1.25))
register_op("brightness", "intensity", 0.15, intensity.brightness,
            brightness_range=(0.75, 1.25))
register_op("bias_field", "intensity", 0.3, intensity.bias_field, subset=True,
            bias_strength=0.3, bias_grid=4)
register_op("blur", "intensity", 0.2, intensity.blur, subset=True, blur_sigma=(0.5, 1.0))
register_op("jitter", "intensity", 1.0, intensity.jitter, jitter_scale=0.1, jitter_shift=0.1)
# Noise reads a fixed bank of Gaussian fields at random offsets (augment_intensity.noise):
# drawing fresh Gaussian numbers cost more than all other intensity ops together.
register_op("noise", "intensity", 0.1, intensity.noise, noise_std=(0.0, 0.1))

PRESETS = {
    "none": (),
    "flip": ("flip",),
    "default": ("flip", "jitter"),  # what augment_labelled/augment_unlabelled do
    "full": ("flip", "rotation", "scaling", "elastic", "gamma", "contrast", "brightness",
             "noise", "bias_field", "blur"),
}
_FUSED = ("rotation", "scaling", "elastic")


def resolve_names(names) -> tuple[str, ...]:
    """A preset name, a comma-separated string or a list -> op names in registry order."""
    if names is None:
        names = "default"
    if isinstance(names, str):
        names = PRESETS[names] if names in PRESETS else [
            n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; available: {', '.join(OPS)} "
                         f"or a preset ({', '.join(PRESETS)})")
    return tuple(n for n in OPS if n in names)


def on_subset(mask, fn, images, labels=None):
    """fn(images[i], labels[i]) for the samples where `mask` [n] is True, the rest unchanged.
    Costs a gather and a scatter; skipped entirely when no sample is chosen."""
    index = tf.where(mask)[:, 0]

    def apply():
        x = tf.gather(images, index)
        y = None if labels is None else tf.gather(labels, index)
        x, y = fn(x, y)
        out_x = tf.tensor_scatter_nd_update(images, index[:, None], x)
        if labels is None:
            return out_x
        return out_x, tf.tensor_scatter_nd_update(labels, index[:, None], y)

    keep = (lambda: images) if labels is None else (lambda: (images, labels))
    out = tf.cond(tf.size(index) > 0, apply, keep)
    return (out, None) if labels is None else out


class Augmenter:
    """The callable `build` returns; `steps` lists (name, probability) in execution order.

    With `jit` (the default) the chain is one XLA-compiled function: every op runs over the
    whole batch with identity parameters for the samples it does not touch (XLA needs static
    shapes, so no gathering of chosen samples), and XLA fuses the elementwise work and the
    resampling's gathers into a few loops, several times faster than TF's kernels one by one
    on a CPU. Ops registered with xla=False (noise) run after it, on their chosen samples.
    `jit=False` runs plain TF ops, computing expensive ops on the chosen samples only.
    """

    def __init__(self, names, params: dict, jit: bool = True):
        self.names = names
        self.params = params
        self.jit = jit
        self.steps = [(n, params[f"p_{n}"]) for n in names]
        self._compiled = tf.function(self._inline, jit_compile=True) if jit else None

    def __call__(self, images, labels=None):
        images = tf.convert_to_tensor(images)
        rank = images.shape.rank
        if rank not in (4, 5):
            raise ValueError(f"augment expects [N, H, W, C] or [N, D, H, W, C], got {images.shape}")
        if labels is not None:
            labels = tf.convert_to_tensor(labels)
            if labels.shape.rank != rank - 1:
                raise ValueError(f"labels {labels.shape} do not match images {images.shape}")
        if not self.names:
            return images if labels is None else (images, labels)
        if not self.jit:
            return self._apply(images, labels, self.names, subsets=True)
        compiled = tuple(n for n in self.names if OPS[n].xla)
        if compiled:
            out = self._compiled(images, labels, compiled)
            images, labels = (out, None) if labels is None else out
        rest = tuple(n for n in self.names if not OPS[n].xla)
        if rest:
            return self._apply(images, labels, rest, subsets=True)
        return images if labels is None else (images, labels)

    def _inline(self, images, labels, names):
        return self._apply(images, labels, names, subsets=False)

    def _apply(self, images, labels, names, subsets: bool):
        rank = images.shape.rank
        n = tf.shape(images)[0]
        p = self.params
        fused = [name for name in _FUSED if name in names]
        flips = {}
        if "flip" in names:
            axes = p["flip_axes"] or range(1, rank - 1)
            flips = {axis: tf.random.uniform([n]) < p["p_flip"] for axis in axes}
            if not fused:  # without a resampling pass, reversing is the cheapest way
                for axis, chosen in flips.items():
                    images, labels = spatial.flip(images, labels, axis=axis, active=chosen)
                flips = {}
        if fused:
            active = {name: tf.random.uniform([n]) < p[f"p_{name}"] for name in fused}
            active.update({f"flip{axis}": chosen for axis, chosen in flips.items()})
            chosen = tf.reduce_any(tf.stack(list(active.values())), axis=0)
            kwargs = dict(
                rotation_degrees=p["rotation_degrees"] if "rotation" in fused else None,
                scale_range=p["scale_range"] if "scaling" in fused else None,
                elastic_alpha=p["elastic_alpha"] if "elastic" in fused else None,
                elastic_grid=p["elastic_grid"])
            if subsets:
                index = tf.where(chosen)[:, 0]
                sub_active = {k: tf.gather(v, index) for k, v in active.items()}
                images, labels = on_subset(
                    chosen, lambda x, y: spatial.random_spatial(x, y, active=sub_active,
                                                                **kwargs), images, labels)
            else:
                images, labels = self._when_any(
                    chosen, lambda x, y: spatial.random_spatial(x, y, active=active, **kwargs),
                    images, labels)
        for name in names:
            if OPS[name].kind != "intensity":
                continue
            fn = OPS[name].fn
            kwargs = {k: p[k] for k in OPS[name].params}
            if p[f"p_{name}"] >= 1:
                images = fn(images, **kwargs)
                continue
            chosen = tf.random.uniform([n]) < p[f"p_{name}"]
            if subsets and OPS[name].subset:
                images, _ = on_subset(
                    chosen, lambda x, y, fn=fn, kwargs=kwargs: (fn(x, **kwargs), y), images)
            else:
                images, _ = self._when_any(
                    chosen, lambda x, y, fn=fn, kwargs=kwargs, chosen=chosen:
                    (fn(x, active=chosen, **kwargs), y), images)
        return images if labels is None else (images, labels)

    @staticmethod
    def _when_any(chosen, fn, images, labels=None):
        """fn(images, labels) over the whole batch, skipped when no sample is chosen."""
        if labels is None:
            return tf.cond(tf.reduce_any(chosen), lambda: fn(images, None)[0],
                           lambda: images), None
        return tf.cond(tf.reduce_any(chosen), lambda: fn(images, labels),
                       lambda: (images, labels))


def build(names="full", *, jit: bool = True, **params) -> Augmenter:
    """The augmentation callable for `names` (a preset: none, default, full; or op names).

    `params`: any op parameter (e.g. rotation_degrees=10, noise_std=(0, 0.05)) and per-op
    probabilities `p_<name>`; an unknown parameter is an error naming the valid ones. `jit`:
    compile the chain with XLA (see Augmenter).
    """
    names = resolve_names(names)
    defaults = {}
    for op in OPS.values():
        defaults.update(op.params)
        defaults[f"p_{op.name}"] = op.probability
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown augmentation parameters {unknown}; valid: "
                         f"{', '.join(sorted(defaults))}")
    for key, value in params.items():
        if key.startswith("p_") and not 0 <= float(value) <= 1:
            raise ValueError(f"{key} must be a probability in [0, 1], got {value}")
    return Augmenter(names, {**defaults, **params}, jit=jit)


# -- the original two-op augmentation (kept: train.py and tests use these names) ---------------
def random_flip(images, labels=None, *, axis: int, seed=None):
    """Flip each sample along spatial `axis` (1 = H, 2 = W) with probability 1/2."""
    n = tf.shape(images)[0]
    flip = tf.random.uniform([n], seed=seed) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, [axis]), images)
    if labels is None:
        return images
    labels = tf.where(flip[:, None, None], tf.reverse(labels, [axis]), labels)
    return images, labels


def intensity_jitter(images, *, scale: float = 0.1, shift: float = 0.1, seed=None):
    """x * (1 + a) + b with a ~ U(-scale, scale), b ~ U(-shift, shift) per sample: a mild
    stand-in for scanner gain and offset differences."""
    return intensity.jitter(images, jitter_scale=scale, jitter_shift=shift, seed=seed)


def augment_labelled(images, labels):
    """Flips along both in-plane axes and intensity jitter, for labelled batches."""
    images, labels = random_flip(images, labels, axis=1)
    images, labels = random_flip(images, labels, axis=2)
    return intensity_jitter(images), labels


def augment_unlabelled(images):
    images = random_flip(images, axis=1)
    images = random_flip(images, axis=2)
    return intensity_jitter(images)
