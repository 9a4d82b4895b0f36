"""Augmentation as TF ops on batches (NHWC / NDHWC images, NHW / NDHW labels), usable eagerly,
inside tf.data, and on an accelerator.

Ops are registered by name (big_vision's preprocessing-op registry) with a per-sample
probability and parameters; `build(names, **params)` returns one callable for the chosen set:

    aug = augment.build("full", rotation_degrees=10, p_noise=0.2)
    images, labels = aug(images, labels)     # labelled batch
    images = aug(images)                     # unlabelled batch

Rotation, scaling and elastic deformation are one resampling pass (bilinear images, nearest
labels); when one of them is in the set, flips are folded into the same pass as a mirroring of
the affine part (a mirrored-only sample maps voxel centres onto voxel centres and is exact),
and a sample that drew only flips is reversed instead of resampled. Every op draws one
Bernoulli(p) per sample, the batch-level, vectorised form of nnU-Net's per-sample augmentation
probabilities (Isensee et al. 2021), whose ranges are the defaults here.
Ops run in registry order: spatial ops, the expensive intensity ops (subset=True), the cheap ones.
How the chosen samples are changed depends on the op's cost (benchmarks/data_pipeline.py):
cheap ops (brightness, jitter; flips when nothing is resampled) run over the whole batch with
identity parameters for the samples they do not touch; the resampling and the expensive ops
run on the chosen samples only. Under XLA (the default) that is one compiled loop over the
samples with a conditional per op, so a sample costs what it drew; without XLA (jit=False) the
chosen samples are gathered, transformed and scattered back.

Presets (PRESETS): none; flip; default = flips + intensity jitter; full = flips, rotation,
scaling, elastic, gamma, contrast, brightness, noise, bias field, blur; randomized = full +
label_intensity; full_gin = full + gin; full_curve = full + intensity_curve. Op names may be
combined freely: "full_gin" is the preset, "gin" the op alone, "flip,gin,noise" a set of ops.

Domain-randomising ops (augment_random): `label_intensity` gives every label region of a
labelled sample a random mean intensity and texture scale (SynthSeg-like; an op that declares
`needs_labels` gets the labels and is skipped on unlabelled batches, so target images are left
as they are), `gin` passes the image through a random shallow conv net (GIN), and
`intensity_curve` maps intensities through a random smooth curve that may invert the contrast.
They run first among the intensity ops, before noise, blur and the bias field.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from uda_tf.data import augment_intensity as intensity
from uda_tf.data import augment_random as randomize
from uda_tf.data import augment_spatial as spatial


@dataclasses.dataclass(frozen=True)
class AugOp:
    name: str
    kind: str  # "spatial" or "intensity"
    probability: float  # default per-sample probability; `p_<name>` overrides it
    params: dict  # parameter defaults, by the names `build` takes
    fn: object = None  # intensity ops: fn(images, active=None, **params)
    subset: bool = False  # expensive: computed for the chosen samples only (module docstring)
    xla: bool = True  # False: kept out of the XLA-compiled chain (run last, on a subset)
    # True: fn(images, labels=..., active=None, **params) reads the labels (never changes
    # them) and is skipped on unlabelled batches.
    needs_labels: bool = False
    check: object = None  # check(params): ValueError naming a parameter that is unusable


OPS: dict[str, AugOp] = {}


def register_op(name: str, kind: str, probability: float, fn=None, *, subset=False, xla=True,
                needs_labels=False, check=None, **params) -> None:
    if name in OPS:
        raise ValueError(f"augmentation {name!r} is already registered")
    OPS[name] = AugOp(name, kind, probability, params, fn, subset, xla, needs_labels, check)


register_op("flip", "spatial", 0.5, flip_axes=None)  # None: every spatial axis, each p
register_op("rotation", "spatial", 0.2, rotation_degrees=15.0)
register_op("scaling", "spatial", 0.2, scale_range=(0.85, 1.25))
register_op("elastic", "spatial", 0.2, elastic_alpha=4.0, elastic_grid=5)
# Expensive intensity ops (subset=True) first: under XLA they run in one loop over the chosen
# samples; the cheap whole-batch ops (brightness, jitter) come after it. The domain-randomising
# ops (augment_random) come first, so that each tissue gets a random mean and spread (or the
# image a random network's contrast) and then the blur, bias field and noise of a scan; then
# nnU-Net's order (noise, blur, contrast, gamma) plus the bias field.
register_op("label_intensity", "intensity", 0.5, randomize.label_intensity, subset=True,
            needs_labels=True, check=randomize.check_label_intensity,
            label_intensity_mean=(0.0, 1.0), label_intensity_texture=(0.5, 1.5),
            label_intensity_texture_flip=0.0, label_intensity_classes=8)
register_op("gin", "intensity", 0.5, randomize.gin, subset=True, check=randomize.check_gin,
            gin_layers=4, gin_channels=2, gin_kernel=3)
register_op("intensity_curve", "intensity", 0.5, randomize.intensity_curve,
            check=randomize.check_intensity_curve, curve_values=(0.0, 1.0))
register_op("noise", "intensity", 0.1, intensity.noise, subset=True, noise_std=(0.0, 0.1))
register_op("blur", "intensity", 0.2, intensity.blur, subset=True, blur_sigma=(0.5, 1.0))
register_op("contrast", "intensity", 0.15, intensity.contrast, subset=True,
            contrast_range=(0.75, 1.25))
register_op("gamma", "intensity", 0.3, intensity.gamma, subset=True, gamma_range=(0.7, 1.5))
register_op("bias_field", "intensity", 0.3, intensity.bias_field, subset=True,
            bias_strength=0.3, bias_grid=4)
register_op("brightness", "intensity", 0.15, intensity.brightness,
            brightness_range=(0.75, 1.25))
register_op("jitter", "intensity", 1.0, intensity.jitter, jitter_scale=0.1, jitter_shift=0.1)

PRESETS = {
    "none": (),
    "flip": ("flip",),
    "default": ("flip", "jitter"),  # what augment_labelled/augment_unlabelled do
    "full": ("flip", "rotation", "scaling", "elastic", "gamma", "contrast", "brightness",
             "noise", "bias_field", "blur"),
}
PRESETS["randomized"] = PRESETS["full"] + ("label_intensity",)
PRESETS["full_gin"] = PRESETS["full"] + ("gin",)  # ("gin" alone is the op)
PRESETS["full_curve"] = PRESETS["full"] + ("intensity_curve",)
# A preset named like an op must mean that op alone: "--augment=flip" cannot be ambiguous.
assert all(PRESETS[n] == (n,) for n in PRESETS if n in OPS)
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


def _mirror(x, y, flips: dict):
    """Reverses spatial axis a of x (and y) where the scalar flips[a] is True."""
    for axis, chosen in flips.items():
        x = tf.cond(chosen, lambda x=x, axis=axis: tf.reverse(x, [axis]), lambda x=x: x)
        if y is not None:
            y = tf.cond(chosen, lambda y=y, axis=axis: tf.reverse(y, [axis]), lambda y=y: y)
    return x, y


def _each_chosen(chosen, fn, images, labels=None):
    """fn(i, images[i:i+1], labels[i:i+1]) -> (x, y) written back for every i where `chosen`
    [n] is True; a loop with in-place updates (XLA keeps the loop-carried batch's buffer)."""
    n = tf.shape(images)[0]

    def take(t, i):  # t[i:i+1], written so that XLA sees a static size
        begin = tf.concat([[i], tf.zeros([t.shape.rank - 1], tf.int32)], 0)
        return tf.slice(t, begin, [1] + t.shape[1:].as_list())

    def body(i, x, *y):
        xi, yi = take(x, i), (take(y[0], i) if y else None)
        # The conditional is on the sample, not the batch: a branch that returned the batch
        # unchanged would make XLA copy it, where the unconditional update stays in place.
        if y:
            xi, yi = tf.cond(chosen[i], lambda: fn(i, xi, yi), lambda: (xi, yi))
            return (i + 1, tf.tensor_scatter_nd_update(x, [[i]], xi),
                    tf.tensor_scatter_nd_update(y[0], [[i]], yi))
        xi = tf.cond(chosen[i], lambda: fn(i, xi, None)[0], lambda: xi)
        return i + 1, tf.tensor_scatter_nd_update(x, [[i]], xi)

    loop_vars = (tf.constant(0), images) + (() if labels is None else (labels,))
    out = tf.while_loop(lambda i, *_: i < n, body, loop_vars)
    return out[1], (out[2] if labels is not None else None)


class Augmenter:
    """The callable `build` returns; `steps` lists (name, probability) in execution order.

    With `jit` (the default) the chain is one XLA-compiled function (`_inline`): XLA fuses the
    elementwise work and the resampling's gathers into a few loops and runs only the branch of
    a conditional that is taken, several times faster than TF's CPU kernels one by one.
    `jit=False` runs plain TF ops, computing expensive ops on gathered chosen samples.
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
            return self._apply(images, labels, self.names)
        compiled = tuple(n for n in self.names if OPS[n].xla)
        if compiled:
            out = self._compiled(images, labels, compiled)
            images, labels = (out, None) if labels is None else out
        rest = tuple(n for n in self.names if not OPS[n].xla)
        if rest:  # ops registered with xla=False run after the compiled chain
            return self._apply(images, labels, rest)
        return images if labels is None else (images, labels)

    def _inline(self, images, labels, names):
        """The XLA chain: every random decision drawn for the batch up front, then one loop
        over the samples that any spatial or expensive op chose, with a conditional per op
        (XLA runs only the branch taken, so a sample pays for the ops it drew and nothing
        else, and no gather/scatter copies the batch), then the cheap ops over the batch."""
        n = tf.shape(images)[0]
        p = self.params
        images, labels, fused, flips = self._flips(images, labels, names)
        spatial_on = {name: tf.random.uniform([n]) < p[f"p_{name}"] for name in fused}
        looped = [name for name in self.intensity_names(names, labels) if OPS[name].subset]
        op_on = {name: tf.random.uniform([n]) < p[f"p_{name}"] for name in looped}
        decisions = [*flips.values(), *spatial_on.values(), *op_on.values()]
        if decisions:
            touched = tf.reduce_any(tf.stack(decisions), axis=0)
            spatial_kwargs = self._spatial_kwargs(fused)

            def one_sample(i, x, y):
                """Sample i ([1, ...] slices x, y) through every op it drew."""
                if fused:
                    # v[i][None], not v[i:i+1]: XLA sizes a dynamic slice as "up to n"
                    active = {k: v[i][None] for k, v in spatial_on.items()}
                    active.update({f"flip{a}": v[i][None] for a, v in flips.items()})
                    resample = tf.reduce_any(tf.stack([v[i] for v in spatial_on.values()]))
                    x, y = tf.cond(
                        resample,
                        lambda: spatial.random_spatial(x, y, active=active, **spatial_kwargs),
                        lambda: _mirror(x, y, {a: v[i] for a, v in flips.items()}))
                for name in looped:
                    kwargs = self._kwargs(name, y)
                    x = tf.cond(op_on[name][i],
                                lambda fn=OPS[name].fn, kwargs=kwargs, x=x: fn(x, **kwargs),
                                lambda x=x: x)
                return x, y

            images, labels = _each_chosen(touched, one_sample, images, labels)
        cheap = [name for name in self.intensity_names(names, labels) if not OPS[name].subset]
        images = self._masked(images, labels, cheap)
        return images if labels is None else (images, labels)

    @staticmethod
    def intensity_names(names, labels):
        """The intensity ops of `names` that apply: those reading labels only with labels."""
        return [name for name in names if OPS[name].kind == "intensity"
                and (labels is not None or not OPS[name].needs_labels)]

    def _kwargs(self, name, labels):
        """The op's parameters, plus labels= for an op that reads them."""
        kwargs = {k: self.params[k] for k in OPS[name].params}
        if OPS[name].needs_labels:
            kwargs["labels"] = labels
        return kwargs

    def _flips(self, images, labels, names):
        """(images, labels, fused, flips): the per-axis flip decisions [n], kept to be folded
        into the resampling pass of the `fused` spatial ops, or applied right away (and {}
        returned) when there is none: two cheap passes over the batch."""
        n = tf.shape(images)[0]
        fused = [name for name in _FUSED if name in names]
        flips = {}
        if "flip" in names:
            axes = self.params["flip_axes"] or range(1, images.shape.rank - 1)
            flips = {axis: tf.random.uniform([n]) < self.params["p_flip"] for axis in axes}
            if not fused:
                for axis, chosen in flips.items():
                    images, labels = spatial.flip(images, labels, axis=axis, active=chosen)
                flips = {}
        return images, labels, fused, flips

    def _spatial_kwargs(self, fused):
        p = self.params
        return dict(rotation_degrees=p["rotation_degrees"] if "rotation" in fused else None,
                    scale_range=p["scale_range"] if "scaling" in fused else None,
                    elastic_alpha=p["elastic_alpha"] if "elastic" in fused else None,
                    elastic_grid=p["elastic_grid"])

    def _apply(self, images, labels, names):
        """Plain TF ops (jit=False): expensive ops on the gathered chosen samples."""
        n = tf.shape(images)[0]
        p = self.params
        images, labels, fused, flips = self._flips(images, labels, names)
        if fused:
            active = {name: tf.random.uniform([n]) < p[f"p_{name}"] for name in fused}
            active.update({f"flip{axis}": chosen for axis, chosen in flips.items()})
            chosen = tf.reduce_any(tf.stack(list(active.values())), axis=0)
            kwargs = self._spatial_kwargs(fused)
            index = tf.where(chosen)[:, 0]
            sub_active = {k: tf.gather(v, index) for k, v in active.items()}
            images, labels = on_subset(
                chosen, lambda x, y: spatial.random_spatial(x, y, active=sub_active, **kwargs),
                images, labels)
        for name in self.intensity_names(names, labels):
            fn = OPS[name].fn
            kwargs = {k: p[k] for k in OPS[name].params}  # labels go with the gathered samples
            if p[f"p_{name}"] >= 1:
                images = fn(images, **self._kwargs(name, labels))
                continue
            chosen = tf.random.uniform([n]) < p[f"p_{name}"]
            if OPS[name].needs_labels:  # the chosen samples' labels are gathered with them
                images = on_subset(
                    chosen, lambda x, y, fn=fn, kwargs=kwargs: (fn(x, labels=y, **kwargs), y),
                    images, labels)[0]
            elif OPS[name].subset:
                images, _ = on_subset(
                    chosen, lambda x, y, fn=fn, kwargs=kwargs: (fn(x, **kwargs), y), images)
            else:
                images, _ = self._when_any(
                    chosen, lambda x, y, fn=fn, kwargs=kwargs, chosen=chosen:
                    (fn(x, active=chosen, **kwargs), y), images)
        return images if labels is None else (images, labels)

    def masked_spatial(self, x):
        """One random spatial transform per sample of the whole batch `x`, every channel moved
        alike (so extra channels, e.g. a teacher's class probabilities, stay aligned with the
        image); samples that draw no op pass through the same resampling with identity
        parameters. No gather and no per-sample loop: the same graph on every replica."""
        x, _, fused, flips = self._flips(x, None, self.names)
        if not fused:  # flips alone were exact reversals, already applied
            return x
        n = tf.shape(x)[0]
        active = {name: tf.random.uniform([n]) < self.params[f"p_{name}"] for name in fused}
        active.update({f"flip{axis}": chosen for axis, chosen in flips.items()})
        return spatial.random_spatial(x, active=active, **self._spatial_kwargs(fused))[0]

    def masked_intensity(self, images):
        """The intensity ops that need no labels over the whole unlabelled batch (`_masked`)."""
        return self._masked(images, None, self.intensity_names(self.names, None))

    def _masked(self, images, labels, names):
        """Intensity ops `names` over the whole batch, each sample changed with the op's
        probability (the others get the op's identity parameters); an op at p = 0 is left
        out."""
        n = tf.shape(images)[0]
        for name in names:
            probability = float(self.params[f"p_{name}"])
            if probability <= 0:
                continue
            chosen = None if probability >= 1 else tf.random.uniform([n]) < probability
            images = OPS[name].fn(images, active=chosen, **self._kwargs(name, labels))
        return images

    @staticmethod
    def _when_any(chosen, fn, images, labels=None):
        """fn(images, labels) over the whole batch, skipped when no sample is chosen."""
        if labels is None:
            return tf.cond(tf.reduce_any(chosen), lambda: fn(images, None)[0],
                           lambda: images), None
        return tf.cond(tf.reduce_any(chosen), lambda: fn(images, labels),
                       lambda: (images, labels))


def build(names="full", *, jit: bool = True, **params) -> Augmenter:
    """The augmentation callable for `names` (a preset of PRESETS, see the module docstring;
    or op names).

    `params`: any op parameter (e.g. rotation_degrees=10, noise_std=(0, 0.05)) and per-op
    probabilities `p_<name>`; an unknown parameter, a probability outside [0, 1] or a value an
    op cannot use (its `check`) is an error naming the parameter. `jit`: compile the chain
    with XLA (see Augmenter).
    """
    names = resolve_names(names)
    defaults = parameter_defaults()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown augmentation parameters {unknown}; valid: "
                         f"{', '.join(sorted(defaults))}")
    for key, value in params.items():
        if key.startswith("p_") and not 0 <= float(value) <= 1:
            raise ValueError(f"{key} must be a probability in [0, 1], got {value}")
    params = {**defaults, **params}
    for op in OPS.values():  # every op's, so that a flag check (preset "none") sees them all
        if op.check is not None:
            op.check(params)
    return Augmenter(names, params, jit=jit)


def parameter_defaults() -> dict:
    """Every op parameter and `p_<name>` probability `build` accepts, with its default."""
    defaults = {}
    for op in OPS.values():
        defaults.update(op.params)
        defaults[f"p_{op.name}"] = op.probability
    return defaults


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


def check_names_flag(name: str, value) -> tuple:
    """The op names of an --*augment flag's value (a preset or comma-separated op names); the
    ValueError names the flag and lists what is valid."""
    try:
        return resolve_names(value)
    except (KeyError, ValueError):
        raise ValueError(f"--{name}={value!r}: expected a preset ({', '.join(PRESETS)}) or "
                         f"comma-separated names from: {', '.join(OPS)}") from None


def check_params_flag(name: str, value) -> None:
    """absl-style check of an --*augment_params flag: items parse, parameters exist, and the
    probabilities and values are ones the ops accept; the ValueError names the flag."""
    build("none", **parse_params(value, flag=name))


def parse_params(items, flag: str = "augment_params") -> dict:
    """["rotation_degrees=10", "p_noise=0.2", "noise_std=0:0.05", "flip_axes=2"] -> build()
    keyword arguments, each value typed like its default (a:b for a range, a:b:c for axes).
    Errors name `flag`, the item and what was expected."""
    defaults = parameter_defaults()
    out = {}
    for item in items or ():
        key, sep, text = (part.strip() for part in str(item).partition("="))
        if not sep or key not in defaults:
            raise ValueError(f"--{flag}: {item!r} must be name=value with name one of "
                             f"{', '.join(sorted(defaults))}")
        default = defaults[key]
        try:
            values = [float(v) for v in text.split(":")]
            if key == "flip_axes":  # None by default: every spatial axis
                value = tuple(int(v) for v in values)
            elif isinstance(default, tuple):
                if len(values) != len(default):
                    raise ValueError
                value = tuple(values)
            elif len(values) != 1 or isinstance(default, int) and not values[0].is_integer():
                raise ValueError
            else:
                value = int(values[0]) if isinstance(default, int) else values[0]
        except ValueError:
            shape = ("low:high" if isinstance(default, tuple) else
                     "axes like 1:2" if key == "flip_axes" else
                     "one integer" if isinstance(default, int) else "one number")
            raise ValueError(f"--{flag}: {key}={text!r} must be {shape} "
                             f"(default {default})") from None
        out[key] = value
    return out
