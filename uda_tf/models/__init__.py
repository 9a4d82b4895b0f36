"""Models: a registry of segmentors, built from resolved flag values in one place.

Every segmentor maps images (slices [N, H, W, C] or patches [N, H, W, D, C]) to a dict:
`logits` [N, *spatial, K] (K = num_classes, or 1 for the sigmoid head), `features` (a coarse
feature map the domain classifiers see) and `encoder<k>` (finer encoder maps, finest first).
train.py, export and predict all build the segmentor through `segmentor_from_flags`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable  # (input_shape, channels, base_filters=, norm=, sync_batchnorm=[, depth=])
    rank: int        # spatial rank: 2 (slices) or 3 (patches of volumes)
    about: str
    has_depth: bool = False  # takes --unet_depth (the U-Nets)


def _unet(attention=False):
    def build(input_shape, channels, **kwargs):
        from uda_tf.models.unet import residual_unet
        return residual_unet(input_shape, channels, attention=attention, **kwargs)
    return build


def _enet(input_shape, channels, **kwargs):
    from uda_tf.models.enet import enet
    return enet(input_shape, channels, **kwargs)


def _drn(input_shape, channels, **kwargs):
    from uda_tf.models.drn import drn
    return drn(input_shape, channels, **kwargs)


MODELS: dict[str, ModelSpec] = {
    "unet2d": ModelSpec(_unet(), 2, "residual U-Net (Shirokikh et al. 2020)", True),
    "attention_unet2d": ModelSpec(_unet(attention=True), 2,
                                  "residual U-Net with attention gates (Oktay et al. 2018)",
                                  True),
    "unet3d": ModelSpec(_unet(), 3, "residual 3D U-Net (Çiçek et al. 2016)", True),
    "enet3d": ModelSpec(_enet, 3, "3D ENet (Paszke et al. 2016)"),
    "drn2d": ModelSpec(_drn, 2, "dilated residual network DRN-C-26 (Yu et al. 2017)"),
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"--model={name!r}: expected one of {', '.join(sorted(MODELS))}") \
            from None


def input_shape_from_flags(values: dict, manifest: dict) -> tuple:
    """The segmentor's input: a prepared slice (H, W, C) for 2D models; a patch
    (*--patch_size, C) for 3D models (default: the whole prepared volume, if all have one
    size). Errors name --model or --patch_size when model and data do not fit."""
    name = values.get("model") or "unet2d"
    spec = get_model(name)
    kind = manifest.get("output", {}).get("records", "slices")
    shape = list(manifest["image_shape"])
    if spec.rank == 2:
        if kind != "slices":
            raise ValueError(f"--model={name} takes 2D slices but the dataset holds 3D volumes "
                             "(prepared with --output=volumes): use a 3D model, e.g. "
                             f"{', '.join(n for n, s in sorted(MODELS.items()) if s.rank == 3)}")
        return tuple(shape)
    if kind != "volumes":
        raise ValueError(f"--model={name} takes 3D patches but the dataset holds 2D slices: "
                         "prepare it with --output=volumes, or use a 2D model")
    patch = list(values.get("patch_size") or ()) or None  # typed: a RunConfig's ints
    if patch is None:
        if None in shape[:3]:
            raise ValueError(f"--model={name}: the volumes have different sizes {shape[:3]}; "
                             "pass --patch_size=h,w,d")
        patch = shape[:3]
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"--patch_size={patch}: expected three positive integers h,w,d")
    return (*patch, shape[3])


DEFAULT_UNET_DEPTH = 3


def model_depth(values: dict) -> int:
    """--unet_depth (a run saved before the flag existed built depth 3)."""
    return int(values.get("unet_depth") or DEFAULT_UNET_DEPTH)


def check_flags(values: dict, manifest: dict) -> None:
    """Every model/head/loss flag against the dataset, before anything is built; a ValueError
    names the flag."""
    from uda_tf.models.heads import output_channels, parse_class_weights
    num_classes = int(manifest["num_classes"])
    shape = input_shape_from_flags(values, manifest)
    name = values.get("model") or "unet2d"
    depth = model_depth(values)
    if get_model(name).has_depth:
        from uda_tf.models.blocks import check_divisible  # what the U-Net checks when built
        try:
            check_divisible(shape, 2 ** depth, f"{depth} halvings")
        except ValueError as e:
            raise ValueError(f"--unet_depth={depth} with --model={name}: {e} (use a smaller "
                             "depth, or prepare/crop to a multiple)") from None
    elif depth != DEFAULT_UNET_DEPTH:
        raise ValueError(f"--unet_depth={depth} applies to the U-Nets "
                         f"({', '.join(n for n, s in sorted(MODELS.items()) if s.has_depth)}); "
                         f"--model={name} has a fixed depth")
    output_channels(values.get("head") or "softmax", num_classes)
    parse_class_weights(values.get("class_weights"), num_classes)


def segmentor_from_flags(values: dict, manifest: dict, *, sync_batchnorm: bool = False):
    """The segmentor train.py builds for these resolved flags and this prepared dataset
    (freshly initialised; load a checkpoint into it). Export and predict rebuild it the same
    way from the run's saved `RunConfig` (`flag_values()`); a flag missing from `values` takes
    its default (unet2d, softmax)."""
    from uda_tf.models.heads import output_channels
    spec = get_model(values.get("model") or "unet2d")
    channels = output_channels(values.get("head") or "softmax", int(manifest["num_classes"]))
    depth = {"depth": model_depth(values)} if spec.has_depth else {}
    return spec.build(input_shape_from_flags(values, manifest), channels,
                      base_filters=int(values["base_filters"]), norm=values["norm"],
                      sync_batchnorm=sync_batchnorm, **depth)
