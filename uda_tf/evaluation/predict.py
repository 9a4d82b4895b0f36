"""Predict NIfTI scans with a trained model and write the predictions in each scan's geometry.

    python -m uda_tf.cli.predict --model=runs/grl/export/uda_segmentor/1 \
        --input='scans/*.nii.gz' --output_dir=predictions [--save_probabilities --save_entropy]
    python -m uda_tf.cli.predict --model=runs/grl/checkpoints/best.weights.h5 \
        --layout=msd --input_dir=/data/MyDataset --output_dir=predictions --tta

Each scan gets the preprocessing the model's training data had (read from the prepared
dataset's manifest: `--manifest`, else the SavedModel's assets.extra/manifest.json, else the
manifest.json next to a checkpoint): reorientation to RAS, foreground crop, intensity clip and
scaling, resampling, slice axis, pad/crop. The model predicts slices in batches (2D) or
Gaussian-weighted sliding-window patches (3D, uda_tf.evaluation.inference), optionally averaged over flips
(`--tta`); then `restore_to_original` undoes the pad/crop, slice axis, resampling and
reorientation, so `<output_dir>/<case>.nii.gz` (uint8 labels) has the input's shape and affine.
`--save_probabilities` / `--save_entropy` add `<case>_probabilities.nii.gz` ([X, Y, Z, K]
float32) and `<case>_entropy.nii.gz` (float32, normalised to [0, 1]). Files are written under a
temporary name and renamed, so a file that exists is complete.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import time

import nibabel as nib
import numpy as np

from uda_tf.evaluation import inference
from uda_tf.data import io
from uda_tf.data.manifest import Manifest, load_manifest
from uda_tf.files import atomic_write, same_or_inside

NIFTI_ENDINGS = (".nii.gz", ".nii")
MAP_SUFFIXES = ("_probabilities", "_entropy", "_translated")


@dataclasses.dataclass
class Predictor:
    """A model ready for whole volumes: `predict_fn(batch) -> probabilities` on prepared
    slices [N, H, W, C] (kind "slices") or patches [N, h, w, d, C] (kind "volumes")."""

    predict_fn: object
    manifest: Manifest
    kind: str = "slices"
    batch_size: int = 32
    context: int = 0
    patch_size: tuple | None = None
    overlap: float = 0.5
    #: prepared slices [N, H, W, C] -> translated slices (a SavedModel's `translate`
    #: signature, one of its outputs), or None
    translate_fn: object = None

    def __post_init__(self):
        self.manifest = Manifest.of(self.manifest)  # a dict built by hand, or a Manifest


def _load_manifest(where: str, flag: str) -> Manifest:
    directory = os.path.dirname(where) if os.path.isfile(where) else where
    try:
        return load_manifest(directory)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{flag}={where}: {e}") from e


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def load_predictor(model: str, *, manifest: str | dict | None = None, flags_path: str | None = None,
                   tta: bool = False, batch_size: int = 32, patch_size=None,
                   overlap: float = 0.5, translation: str | None = None) -> Predictor:
    """A SavedModel directory (`serving_default`, as uda_tf.serving.export writes it) or a
    `.weights.h5` checkpoint with its run's config.json or flags.cfg (`flags_path`, default
    the one next to it). `translation`: an output of the SavedModel's `translate` signature
    (AttENT's to_target / to_source) to write beside each prediction."""
    if isinstance(manifest, str):
        manifest = _load_manifest(manifest, "--manifest")
    if _is_saved_model(model):
        predict_fn, model_shape, manifest = _saved_model_fn(model, manifest)
    elif model.endswith(".weights.h5") and os.path.isfile(model):
        predict_fn, model_shape, manifest = _checkpoint_fn(model, manifest, flags_path)
    else:
        raise ValueError(f"--model={model} is neither a SavedModel directory (with "
                         "saved_model.pb) nor a .weights.h5 checkpoint")
    manifest = Manifest.of(manifest)  # a dict built by hand, or a Manifest
    kind = manifest.record_kind
    inference.check_model_input(
        model_shape, manifest.image_shape, model=f"--model={model}", patches=kind == "volumes",
        data=f"the manifest's image_shape ({kind} of {manifest.dataset_name})")
    if kind == "volumes":
        patch_size = patch_size or (model_shape[:3] if None not in model_shape[:3] else None)
        if not patch_size:
            raise ValueError("--patch_size is required: the 3D model takes patches of any size")
    if tta:
        axes = (1, 2) if kind == "slices" else (1, 2, 3)
        predict_fn = inference.flip_tta(predict_fn, axes)
    translate_fn = None
    if translation:
        translate_fn = _translate_fn(model, translation, kind)
    return Predictor(predict_fn, manifest, kind, int(batch_size),
                     manifest.context_slices,
                     None if patch_size is None else tuple(int(p) for p in patch_size),
                     float(overlap), translate_fn)


def _translate_fn(model: str, output: str, kind: str):
    """Prepared slices -> the `output` of the SavedModel's `translate` signature; a
    ValueError naming --save_translation for a model or data that cannot give it."""
    import tensorflow as tf
    from uda_tf.serving.export import TRANSLATE, load_serving_fn
    flag = f"--save_translation={output}"
    if not _is_saved_model(model):
        raise ValueError(f"{flag}: needs an exported SavedModel with a {TRANSLATE!r} "
                         f"signature (--method=attent exports one); --model={model} is not one")
    if kind != "slices":
        raise ValueError(f"{flag}: translation is written for 2D models only")
    fn = load_serving_fn(model, TRANSLATE, flag="--model")
    outputs = sorted(fn.structured_outputs)
    if output not in outputs:
        raise ValueError(f"{flag}: the model's {TRANSLATE!r} signature returns {outputs}")
    return lambda batch: fn(image=tf.constant(batch, tf.float32))[output].numpy()


def _saved_model_fn(model: str, manifest: dict | None):
    """(batch -> probabilities, the model's input shape without the batch axis, the manifest:
    the given one, else the one the export carries in assets.extra/)."""
    from uda_tf.serving.export import image_input_shape, load_serving_fn
    if manifest is None:
        assets = os.path.join(model, "assets.extra")
        if not os.path.isfile(os.path.join(assets, "manifest.json")):
            raise ValueError(f"--model={model} carries no assets.extra/manifest.json; pass "
                             "--manifest=<prepared dir>/manifest.json of its training data")
        manifest = _load_manifest(assets, "--model")
    serving = load_serving_fn(model)
    return (inference.saved_model_fn(serving), image_input_shape(serving, model)[1:],
            manifest)


def _checkpoint_fn(model: str, manifest: dict | None, flags_path: str | None):
    """As `_saved_model_fn`, for a `.weights.h5` checkpoint: the segmentor its run's config
    describes (`flags_path`: a config.json or flags.cfg; default the one next to it), the
    manifest found next to it or in the run's --data_dir unless given."""
    import tensorflow as tf
    from uda_tf.models import segmentor_from_flags
    from uda_tf.models.heads import class_probabilities
    from uda_tf.training.config import CONFIG_FILE, read_run_config, run_config_file
    here = os.path.dirname(os.path.abspath(model))
    flags_path = flags_path or run_config_file(here)
    if flags_path is None or not os.path.isfile(flags_path):
        raise ValueError(f"--model={model} is a checkpoint but "
                         f"--flags={flags_path or os.path.join(here, CONFIG_FILE)} does not "
                         "exist; pass the config.json or flags.cfg of the run that trained it")
    config = read_run_config(flags_path)
    if manifest is None:
        candidates = [here, config.data_dir or ""]
        found = [c for c in candidates if os.path.isfile(os.path.join(c, "manifest.json"))]
        if not found:
            raise ValueError(f"no manifest.json next to --model={model} or in the run's "
                             f"--data_dir; pass --manifest")
        manifest = _load_manifest(found[0], "--manifest")
    from uda_tf.serving.safe_load import check_weights_file
    check_weights_file(model, "--model")
    segmentor = segmentor_from_flags(config.flag_values(), manifest)
    try:
        segmentor.load_weights(model)
    except Exception as e:  # keras raises ValueError/KeyError for mismatched layers
        raise ValueError(f"--model={model} does not fit the segmentor that --flags="
                         f"{flags_path} describes: {e}") from e

    def predict_fn(batch):
        logits = segmentor(tf.constant(batch, tf.float32), training=False)["logits"]
        return class_probabilities(logits).numpy()
    return predict_fn, list(segmentor.input_shape[1:]), manifest


def predict_volume(predictor: Predictor, volume: io.Volume) -> tuple[np.ndarray, dict]:
    """Probabilities [H, W, D, K] on the prepared grid of one scan, and its preprocessing
    record (the manifest's per-case entry, which `restore_to_original` reads)."""
    prepared, record = _prepared(predictor, volume)
    return _probabilities(predictor, prepared, record), record


def _prepared(predictor: Predictor, volume: io.Volume):
    from uda_tf.data import preprocess
    config = preprocess.PreprocessConfig.from_manifest(predictor.manifest.preprocessing)
    prepared, _, record = preprocess.preprocess_volumes(volume, None, config)
    return (prepared[..., None] if prepared.ndim == 3 else prepared), record


def _probabilities(predictor: Predictor, prepared, record) -> np.ndarray:
    if predictor.kind == "slices":
        probs = inference.predict_slices(predictor.predict_fn, prepared,
                                         batch_size=predictor.batch_size,
                                         context=predictor.context)
    else:
        probs = inference.sliding_window(predictor.predict_fn, prepared, predictor.patch_size,
                                         overlap=predictor.overlap,
                                         batch_size=predictor.batch_size,
                                         pad_value=record["crop_pad"]["pad_value"])
    return probs


def first_path(path) -> str:
    """The file of channel 0 of an input (a path, or a multi-channel scan's tuple of paths)."""
    return path if isinstance(path, str) else path[0]


def predict_file(predictor: Predictor, path, *, probabilities: bool = False,
                 entropy: bool = False) -> dict:
    """{"labels": uint8, ["probabilities": float32 [.., K]], ["entropy": float32],
    ["translated": float32, with the predictor's translate_fn]} on the on-disk grid of `path`
    (a file, or the files of a multi-channel scan, channel 0 first), plus "affine" (the
    file's). The translated image is in the prepared data's normalised intensities."""
    from uda_tf.data.preprocess import restore_to_original
    volume = io.read_channels(path)
    channels = volume.array.shape[3] if volume.array.ndim == 4 else 1
    expected = predictor.manifest.image_shape[-1] // (2 * predictor.context + 1)
    if channels != expected:
        raise ValueError(f"{first_path(path)}: the scan has {channels} channel(s), the model "
                         f"was trained on {expected} (a multi-channel dataset's case is "
                         "<case>_0000, <case>_0001, ...: pass all of its files, or --layout)")
    prepared, record = _prepared(predictor, volume)
    probs = _probabilities(predictor, prepared, record)
    preprocessing = predictor.manifest.preprocessing
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    out = {"labels": restore_to_original(labels, record, preprocessing, order=0)
           .astype(np.uint8), "affine": np.asarray(volume.original_affine)}
    if probabilities:
        restored = restore_to_original(probs, record, preprocessing, order=1, fill=0.0)
        # Voxels outside the prepared field of view (cropped away) are certain background.
        restored[..., 0][restored.sum(axis=-1) <= 0] = 1.0
        out["probabilities"] = restored.astype(np.float32)
    if entropy:
        out["entropy"] = restore_to_original(inference.normalized_entropy(probs), record,
                                             preprocessing, order=1, fill=0.0).astype(np.float32)
    if predictor.translate_fn is not None:
        translated = inference.predict_slices(predictor.translate_fn, prepared,
                                              batch_size=predictor.batch_size)
        # Outside the prepared field of view there is no translation: it gets what the
        # translator makes of a background-only slice (the prepared pad value).
        pad = record["crop_pad"]["pad_value"]
        background = float(np.median(predictor.translate_fn(np.full_like(prepared[None, :, :, 0],
                                                                          pad))))
        out["translated"] = restore_to_original(translated[..., 0], record, preprocessing,
                                                order=1, fill=background).astype(np.float32)
    return out


def write_nifti(path: str, array: np.ndarray, affine, like: str | None = None) -> None:
    """Writes a NIfTI atomically (a hidden temporary name in the same directory, then
    os.replace); with `like` (the input scan, same voxel grid), keeps that file's qform and
    sform, each with its own matrix and code, and its units.

    The two may differ (scanner qform, registered sform): viewers and tools that read the
    qform (ITK, FSL with some codes) must place the prediction where they place the scan,
    so neither is replaced by the other. A NIfTI-2 scan gets a NIfTI-2 prediction: its
    float64 quaternion does not survive NIfTI-1's float32."""
    header = None if like is None else nib.load(like).header
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = kind(np.asarray(array), np.asarray(affine, np.float64))
    if header is not None:
        if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
            # No coded orientation: readers use pixdim alone, which `affine` already encodes.
            image.set_sform(None, code=0)
            image.set_qform(None, code=0)
        else:
            sform, sform_code = header.get_sform(coded=True)
            image.set_sform(sform, code=int(sform_code))  # matrix None with code 0: unset
            qform_code = int(header["qform_code"])
            qform = None
            if qform_code:
                try:
                    qform = header.get_qform()
                except ValueError:  # a quaternion nibabel cannot decode: the affine stands in
                    qform = image.affine
            image.set_qform(qform, code=qform_code)
        image.header.set_xyzt_units(*header.get_xyzt_units())
    with atomic_write(path, None) as tmp:
        nib.save(image, tmp)


def _split_channel(path: str) -> tuple[str, int | None]:
    """(file name without .nii(.gz) and nnU-Net's channel suffix _NNNN, that channel number
    or None)."""
    name = os.path.basename(path)
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        return name[:-5], int(name[-4:])
    return name, None


def case_id_of(path: str) -> str:
    """File name without .nii(.gz) and without nnU-Net's channel suffix _0000."""
    return _split_channel(path)[0]


def resolve_inputs(patterns=(), layout: str | None = None, input_dir: str | None = None,
                   layout_options: dict | None = None):
    """[(case_id, path)] from file paths/globs, or from every case of a raw dataset layout
    (`layout_options` go to its reader, e.g. {"image_glob": ...} for layout "glob")."""
    if layout and input_dir:
        from uda_tf.data.layouts import read_layout
        listing = read_layout(layout, input_dir, **(layout_options or {}))
        return [(c.case_id, c.image_paths if c.channel_paths else c.image_path)
                for c in listing.cases]
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input={pattern} matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input: {path} is not a file")
            if not path.endswith(NIFTI_ENDINGS):
                raise ValueError(f"--input: {path} is not a NIfTI file (.nii or .nii.gz)")
            found.append((case_id_of(path), path))
    seen = {}
    for case_id, paths in _group_channels(found).items():
        if len(paths) > 1 and isinstance(paths, list):
            raise ValueError(f"--input: {paths[0]} and {paths[1]} both give case id {case_id!r}")
        seen[case_id] = paths if isinstance(paths, tuple) else paths[0]
    if not seen:
        raise ValueError("no input: pass --input=<files or globs> or --layout with --input_dir")
    return sorted(seen.items())


def _group_channels(found) -> dict:
    """{case id: [path]} of (case id, path) pairs, where the files of one multi-channel scan
    (<case>_0000, <case>_0001, ... with every channel from 0) become one tuple, channel 0
    first; other files sharing a case id stay a list (an error for the caller)."""
    groups: dict[str, list[str]] = {}
    for case_id, path in found:
        groups.setdefault(case_id, []).append(path)
    out = {}
    for case_id, paths in groups.items():
        numbers = [_split_channel(p)[1] for p in paths]
        if len(paths) > 1 and None not in numbers and sorted(numbers) == list(range(len(paths))):
            out[case_id] = tuple(p for _, p in sorted(zip(numbers, paths)))
        else:
            out[case_id] = paths
    return out


# Folders of an MSD/nnU-Net dataset root that hold its scans and ground truth.
DATASET_FOLDERS = ("imagesTr", "imagesTs", "labelsTr", "labelsTs")


class OutputWouldReplaceInputError(ValueError):
    """--output_dir is where the inputs or a dataset's labels live."""


def protected_paths(cases, layout: str | None = None, input_dir: str | None = None,
                    layout_options: dict | None = None
                    ) -> tuple[dict[str, tuple[str, bool]], dict[str, str]]:
    """({folder: (why, nested)}, {file: why}) that predictions must not be written into or
    over. Folders: those of the input scans; with `layout`/`input_dir`, those of every label
    and mask the layout lists and the dataset's imagesTr/imagesTs/labelsTr/labelsTs; for scans
    in an imagesTr/imagesTs folder, that dataset's four folders too (its labelsTr holds the
    ground truth `<case>.nii.gz` that a prediction `<case>.nii.gz` would replace). `nested`:
    an --output_dir inside the folder is refused as well; it is False only for a plain folder
    of `--input` scans, where `scans/predictions/` is a usual place for the outputs and can
    replace nothing. Paths are resolved (symlinks followed)."""
    folders, files = {}, {}

    def add_file(path, what, nested):
        if path:
            files.setdefault(os.path.realpath(path), f"{what} {path}")
            folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
            why, was_nested = folders.get(folder, (f"it holds {what}s such as {path}", False))
            folders[folder] = (why, was_nested or nested)

    def add_folder(path, why):
        if os.path.isdir(path):
            folders[os.path.realpath(path)] = (why, True)

    for _, paths in cases:
        for path in (paths,) if isinstance(paths, str) else paths:
            add_file(path, "input scan", False)
        path = first_path(paths)
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.basename(parent) in DATASET_FOLDERS:
            for name in DATASET_FOLDERS:
                add_folder(os.path.join(os.path.dirname(parent), name),
                           f"it is {name}/ of the dataset the input {path} belongs to")
    if layout and input_dir:
        from uda_tf.data.layouts import read_layout
        for case in read_layout(layout, input_dir, skip_bad_cases=True,
                                **(layout_options or {})).cases:
            add_file(case.label_path, "label", True)
            add_file(case.mask_path, "mask", True)
        for name in DATASET_FOLDERS:
            add_folder(os.path.join(input_dir, name), f"it is {name}/ of --input_dir={input_dir}")
    return folders, files


def output_targets(cases, output_dir: str, *, save_probabilities=False, save_entropy=False,
                   save_translation=False) -> list[tuple[str, str, str, str]]:
    """[(case_id, input path, result key, output path)] of every file predict would write.
    A case id must be a plain name (it becomes a file name under `output_dir`), and two
    outputs may not share a path (case `x_entropy` against the entropy map of case `x`)."""
    from uda_tf.files import check_name, inside
    keys = [("labels", "")]
    keys += [("probabilities", MAP_SUFFIXES[0])] if save_probabilities else []
    keys += [("entropy", MAP_SUFFIXES[1])] if save_entropy else []
    keys += [("translated", MAP_SUFFIXES[2])] if save_translation else []
    targets, seen = [], {}
    for case_id, path in cases:
        check_name(case_id, f"case id of {first_path(path)}", what="case id")
        for key, suffix in keys:
            target = os.path.join(output_dir, f"{case_id}{suffix}.nii.gz")
            inside(output_dir, target, "--output_dir")
            if target in seen:
                raise ValueError(f"--output_dir={output_dir}: cases {seen[target]!r} and "
                                 f"{case_id!r} would both write {target}; rename one input")
            seen[target] = case_id
            targets.append((case_id, path, key, target))
    return targets


def check_outputs(targets, output_dir: str, protected, *,
                  overwrite_input_files: bool = False) -> None:
    """Refuses, before anything is predicted, an --output_dir that is a folder of inputs or
    labels (or lies inside one, see `protected_paths`), and an output file that would replace
    an input file, unless `overwrite_input_files`. Existing files of an ordinary output
    folder (an earlier predict of the same cases) are replaced, as a rerun is expected to;
    each atomically."""
    if overwrite_input_files:
        return
    folders, files = protected
    how = ("choose another --output_dir, or pass --overwrite_input_files to write there "
           "anyway; nothing was written")
    real_out = os.path.realpath(output_dir)
    for folder, (why, nested) in sorted(folders.items()):
        if real_out == folder or (nested and same_or_inside(real_out, folder)):
            where = "is" if real_out == folder else "lies inside"
            raise OutputWouldReplaceInputError(
                f"--output_dir={output_dir} {where} {folder}, and {why}: predictions "
                f"(<case>.nii.gz) there can replace input scans or ground truth; {how}")
    for case_id, _, _, target in targets:
        real = os.path.join(real_out, os.path.basename(target))
        if real in files:
            raise OutputWouldReplaceInputError(
                f"--output_dir={output_dir}: the prediction {target} of case {case_id!r} "
                f"would replace the {files[real]}; {how}")


def predict_cases(predictor: Predictor, cases, output_dir: str, *, save_probabilities=False,
                  save_entropy=False, say=print, layout: str | None = None,
                  input_dir: str | None = None, overwrite_input_files: bool = False,
                  layout_options: dict | None = None) -> list[str]:
    """Predicts every (case_id, path) and writes <output_dir>/<case_id>[suffix].nii.gz.

    Every output path is checked first (`output_targets`, `check_outputs` against the inputs
    and, with `layout`/`input_dir`, the dataset's labels); the output folder is locked for
    the run (`files.OutputLock`: a second predict into it is refused, naming this one)."""
    from uda_tf.files import OutputLock
    targets = output_targets(cases, output_dir, save_probabilities=save_probabilities,
                             save_entropy=save_entropy,
                             save_translation=predictor.translate_fn is not None)
    check_outputs(targets, output_dir,
                  protected_paths(cases, layout, input_dir, layout_options),
                  overwrite_input_files=overwrite_input_files)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"--output_dir={output_dir} is a file, not a directory")
    written = []
    with OutputLock(output_dir, "predict --output_dir"):
        for n, (case_id, path) in enumerate(cases, 1):
            start = time.time()
            result = predict_file(predictor, path, probabilities=save_probabilities,
                                  entropy=save_entropy)
            for _, _, key, target in (t for t in targets if t[0] == case_id):
                # A picture (DRIVE, STARE) has no NIfTI header to copy: its prediction is a
                # NIfTI [rows, cols, 1] on the picture's pixel grid (identity affine).
                first = first_path(path)
                write_nifti(target, result[key], result["affine"],
                            like=None if io.is_picture(first) else first)
                written.append(target)
            say(f"[{n}/{len(cases)}] {case_id}: {first_path(path)} -> {output_dir} "
                f"({time.time() - start:.1f} s)")
    return written
