"""SavedModel export of the segmentor for TF Serving.

    python -m uda_tf.cli.export --checkpoint=runs/grl/checkpoints/best.weights.h5
    (console script: uda-export; thin script: export/export_savedmodel.py)

Layout `<export_root>/<model_name>/<version>/` is the one TF Serving watches. Signatures:

* `serving_default`: `image` [N, H, W, C] float32, slices already preprocessed as by
  `python -m uda_tf.cli.prepare` -> `probabilities` [N, H, W, K] float32, `labels` [N, H, W] int32,
  `entropy` [N, H, W] float32 (normalised to [0, 1]). 3D models take patches [N, h, w, d, C]
  of their training patch size and return [N, h, w, d, ...] alike; a sigmoid head's one logit
  is returned as K = 2 probabilities.
* `serving_raw` (exported when the manifest is given): `image` [N, H, W, C] float32 raw
  intensities already on the prepared grid (the recorded crop, resampling, slice axis and
  pad/crop, padding with a value <= p_low: `uda_tf.data.preprocess.apply_geometry(raw,
  spacing, case, preprocessing, fill=p_low)`), plus per-slice `p_low`, `p_high` [N] float32
  (and `mean`, `std` [N] when the manifest's normalization is zscore): the clip values and
  statistics of the slice's volume as `uda_tf.data.preprocess.normalize_intensity` computes
  them (the manifest's `intensity` of a prepared case). The graph clips to [p_low, p_high] and
  scales ((x - p_low) / (p_high - p_low), or (x - mean) / std; a zero scale counts as 1), then
  runs `serving_default`'s computation. `prepare` normalises before it resamples, so the two
  paths differ only where interpolation mixes clipped and unclipped voxels.

`assets.extra/` holds `manifest.json` (the prepared dataset's manifest), `label_names.json`,
`config.json` (the run's `RunConfig`, when the export knows it) and `tf_serving_warmup_requests` (PredictionLog records TF Serving replays at load time).
* `translate` (exported with `translators`, e.g. by --method=attent): `image` [N, H, W, C]
  preprocessed -> one output per translator, the translated image of the same shape
  (AttENT: `to_target` = G_S->T, `to_source` = G_T->S), for inspecting what the segmentor
  was trained on.

Only the segmentor (and translators, when given) are exported, never the method's wrapper
(docs/DESIGN.md).
"""
from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from uda_tf.data.manifest import Manifest
from uda_tf.files import OutputLock, check_name, write_json
from uda_tf.losses import entropy_map
from uda_tf.models.heads import class_probabilities
from uda_tf.serving.protocol import predict_request, raw_input_names
from uda_tf.training.config import CONFIG_FILE, RunConfig, read_run_config, run_config_file

SERVING_DEFAULT = "serving_default"
SERVING_RAW = "serving_raw"
TRANSLATE = "translate"
OUTPUTS = ("probabilities", "labels", "entropy")
WARMUP_FILE = "tf_serving_warmup_requests"
# The allowed batch sizes of export/serving/batching.config: TF Serving pads every batch up to
# one of them, so warming each one up moves its one-off cost (graph optimisation, oneDNN or
# cuDNN kernel choice per shape) from the first user request to load time.
SERVING_BATCH_SIZES = (1, 4, 16, 64)
# A warm-up request holds its whole batch: 64 patches of 128^3 voxels would be 512 MiB in
# assets.extra. Batch sizes whose request exceeds this are not warmed up (size 1 always is).
WARMUP_MAX_BYTES = 64 << 20


def next_version(model_dir: str) -> int:
    """TF Serving versions are integers; a new export takes the next free one."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def normalize_raw(image, stats: dict, normalization: str):
    """In-graph version of `preprocess.normalize_intensity` with given statistics: clip to
    [p_low, p_high] of the slice's volume, then min-max or z-score. A zero scale becomes 1,
    as in `preprocess.intensity_transform`."""
    # [N] -> [N, 1, ..., 1]: one value per slice (or patch), whatever the image rank.
    rank = image.shape.rank
    per_slice = {k: tf.reshape(v, [-1] + [1] * (rank - 1)) for k, v in stats.items()}
    clipped = tf.clip_by_value(image, per_slice["p_low"], per_slice["p_high"])
    if normalization == "minmax":
        offset, scale = per_slice["p_low"], per_slice["p_high"] - per_slice["p_low"]
    else:
        offset, scale = per_slice["mean"], per_slice["std"]
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    return (clipped - offset) / scale


def warmup_inputs(signature: str, shape, normalization: str | None, batch_size: int) -> dict:
    """Inputs of one warm-up request: a background-only batch (zeros after normalisation),
    which exercises every op of the graph at the given batch size."""
    images = np.zeros((batch_size, *shape), np.float32)
    if signature in (SERVING_DEFAULT, TRANSLATE):
        return {"image": images}
    stats = {"p_low": 0.0, "p_high": 1.0, "mean": 0.5, "std": 0.25}
    return {name: images if name == "image" else np.full([batch_size], stats[name], np.float32)
            for name in raw_input_names(normalization)}


def write_warmup_requests(path: str, model_name: str, requests) -> int:
    """`requests`: (signature_name, inputs dict). Writes TF Serving's warm-up file (TFRecord of
    PredictionLog protos, assets.extra/tf_serving_warmup_requests); returns the count."""
    from tensorflow_serving.apis import prediction_log_pb2

    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests:
            request = predict_request(model_name, inputs, signature=signature)
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    return count


def check_export_target(export_root: str, model_name: str, *,
                        root_flag: str = "--export_dir", name_flag: str = "--model_name") -> str:
    """`<export_root>/<model_name>` if a version can be written there, else a named error.

    Checked before anything is written: the name must be one plain path component (a `/` or
    `..` would put the SavedModel outside the export root), and neither the root nor the model
    directory may be an existing file."""
    check_name(model_name, name_flag, what="model name")
    if os.path.exists(export_root) and not os.path.isdir(export_root):
        raise NotADirectoryError(f"{root_flag}={export_root} is a file, not a directory; the "
                                 "SavedModel goes to <export_dir>/<model_name>/<version>/")
    model_dir = os.path.join(export_root, model_name)
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise NotADirectoryError(f"{name_flag}={model_name}: {model_dir} is a file, not a model "
                                 "directory of versions")
    return model_dir


def export_segmentor(segmentor: keras.Model, export_root: str, model_name: str,
                     version: int | None = None, *, manifest: dict | None = None,
                     config: RunConfig | None = None,
                     warmup_batch_sizes=SERVING_BATCH_SIZES, translators=None) -> str:
    """Write the SavedModel atomically (temporary directory, then rename); returns its path.

    With `manifest` (the prepared dataset's), also exports `serving_raw` and puts the manifest
    and label names into assets.extra/; with `config` (the run's), config.json there too. Warm-up requests cover every signature at each of
    `warmup_batch_sizes` (the server's allowed batch sizes). `translators` ({output name:
    image -> image keras.Model}) adds the `translate` signature.

    One export at a time per model directory: `OutputLock(<export_root>/<model_name>)` is held
    from choosing the version to the rename, so two exports never take the same number, and an
    existing version is never written over. TF Serving ignores the lock file and the hidden
    `.<version>.partial` directory (it loads only children with integer names)."""
    model_dir = check_export_target(export_root, model_name)
    with OutputLock(model_dir, "export"):
        return _write_version(segmentor, model_dir, model_name, version,
                              None if manifest is None else Manifest.of(manifest), config,
                              warmup_batch_sizes, translators or {})


def _write_version(segmentor, model_dir, model_name, version, manifest, config,
                   warmup_batch_sizes, translators):
    version = next_version(model_dir) if version is None else int(version)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version already exists: {final}; it is kept (choose "
                              "another --version, or leave --version out for the next free one)")
    shape = tuple(segmentor.input_shape[1:])
    normalization = raw_names = None
    if manifest is not None:
        # 2D slices must match the dataset's slices; 3D models take patches of any size.
        if len(manifest.image_shape) == len(shape) == 3 and manifest.image_shape != list(shape):
            raise ValueError(f"manifest image_shape {manifest.image_shape} does not match the "
                             f"segmentor's input shape {list(shape)}")
        normalization = manifest.preprocessing["normalization"]
        raw_names = raw_input_names(normalization)  # fails early on an unknown normalization
    tmp = os.path.join(model_dir, f".{version}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    archive, signatures = _export_archive(segmentor, shape, normalization, raw_names,
                                          translators)
    try:
        archive.write_out(tmp, verbose=False)
        _write_assets(os.path.join(tmp, "assets.extra"), manifest, model_name, shape,
                      normalization, signatures, warmup_batch_sizes)
        if config is not None:
            config.save(os.path.join(tmp, "assets.extra", CONFIG_FILE))
        # rename(2) replaces an empty directory silently: check again right before it.
        if os.path.lexists(final):
            raise FileExistsError(f"export version already exists: {final} (created while "
                                  "this export ran, by something that ignores the lock); "
                                  "it is kept")
        os.replace(tmp, final)
    except (OSError, tf.errors.OpError) as e:  # a full disk surfaces as either
        kept = [os.path.join(model_dir, d) for d in sorted(os.listdir(model_dir))
                if d.isdigit()]
        raise OSError(f"writing the SavedModel {final} failed: {e}; the partial export was "
                      f"removed, kept: {', '.join(kept) or 'no earlier version'}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _export_archive(segmentor, shape, normalization, raw_names, translators=None):
    """(ExportArchive, signature names): `serving_default`, and with `raw_names` (a
    manifest's) also `serving_raw`, which normalizes raw intensities as `normalization` says;
    with `translators` also `translate`.
    The segmentor's graph is built once: `serving_raw` calls `serving_default`'s function
    (one function in the SavedModel, referenced by both signatures)."""
    image_spec = tf.TensorSpec([None, *shape], tf.float32, name="image")

    @tf.function(input_signature=[image_spec], autograph=False)
    def serve(image):
        logits = segmentor(image, training=False)["logits"]
        probs = class_probabilities(logits)  # softmax or sigmoid head, always K channels
        return {"probabilities": probs,
                "labels": tf.argmax(probs, axis=-1, output_type=tf.int32),
                "entropy": entropy_map(probs)}

    # The endpoints' variables are tracked from the traced functions (ExportArchive collects
    # what they capture). `archive.track(segmentor)` is not called: it only adds lookup tables
    # found by walking every layer (a segmentor has none), and that walk was a quarter of the
    # export's time.
    archive = keras.export.ExportArchive()
    serve.get_concrete_function()  # traced: ExportArchive takes a tf.function as it is
    archive.add_endpoint(SERVING_DEFAULT, serve)
    signatures = [SERVING_DEFAULT]
    if raw_names is not None:
        # Keyword inputs give the signature its input names (image, p_low, ...), which is
        # what REST "inputs"/"instances" and gRPC PredictRequest.inputs are keyed by.
        raw_spec = {name: image_spec if name == "image"
                    else tf.TensorSpec([None], tf.float32, name=name) for name in raw_names}

        @tf.function(input_signature=[raw_spec], autograph=False)
        def serve_raw(inputs):
            stats = {k: v for k, v in inputs.items() if k != "image"}
            return serve(normalize_raw(inputs["image"], stats, normalization))

        serve_raw.get_concrete_function()
        archive.add_endpoint(SERVING_RAW, serve_raw)
        signatures.append(SERVING_RAW)
    if translators:
        for out_name, net in translators.items():
            if tuple(net.input_shape[1:]) != tuple(shape) or tuple(
                    net.output_shape[1:]) != tuple(shape):
                raise ValueError(f"translator {out_name!r} maps {net.input_shape[1:]} -> "
                                 f"{net.output_shape[1:]}; the segmentor takes {shape}")

        @tf.function(input_signature=[image_spec], autograph=False)
        def translate(image):
            return {name: tf.cast(net(image, training=False), tf.float32)
                    for name, net in translators.items()}

        translate.get_concrete_function()
        archive.add_endpoint(TRANSLATE, translate)
        signatures.append(TRANSLATE)
    return archive, signatures


def _write_assets(extra, manifest, model_name, shape, normalization, signatures,
                  warmup_batch_sizes):
    """assets.extra/: the manifest and label names (with a manifest) and the warm-up
    requests."""
    os.makedirs(extra, exist_ok=True)
    if manifest is not None:
        write_json(os.path.join(extra, "manifest.json"), manifest, indent=1, sort_keys=True)
        write_json(os.path.join(extra, "label_names.json"), manifest["label_names"],
                   indent=1, sort_keys=True)  # as the file has them: keys "0", "1", ...
    if None not in shape:  # a model taking any patch size has no one request to replay
        request_bytes = 4 * int(np.prod(shape))
        sizes = [n for n in warmup_batch_sizes
                 if n == min(warmup_batch_sizes) or n * request_bytes <= WARMUP_MAX_BYTES]
        write_warmup_requests(
            os.path.join(extra, WARMUP_FILE), model_name,
            [(sig, warmup_inputs(sig, shape, normalization, n))
             for sig in signatures for n in sizes])


class SignatureError(ValueError):
    """A SavedModel lacks the signature (or the `image` input) uda_tf calls."""


def load_serving_fn(path: str, signature: str = SERVING_DEFAULT, flag: str = "--model"):
    """One signature of a SavedModel, as a callable taking keyword tensors -> dict.

    A SavedModel saved without signatures (`tf.saved_model.save` of a tf.Module) or under
    other names is a SignatureError listing the ones it has, not a KeyError."""
    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        has = sorted(loaded.signatures)
        raise SignatureError(
            f"{flag}={path}: the SavedModel has no signature {signature!r}; it has "
            f"{has if has else 'no signatures at all'} (uda-export writes {SERVING_DEFAULT!r} "
            "taking 'image' [N, H, W, C] float32 and returning 'probabilities')")
    fn = loaded.signatures[signature]
    fn._loaded = loaded  # keep the object (and its variables) alive with the function
    return fn


def image_input_shape(fn, path: str, flag: str = "--model") -> list:
    """[None, H, W, C] (or [None, h, w, d, C]) of the signature's `image` input, with None for
    sizes it leaves open; a SignatureError when it takes no `image` or returns no
    `probabilities`."""
    _, inputs = fn.structured_input_signature
    spec = inputs.get("image")
    if spec is None:
        raise SignatureError(f"{flag}={path}: its {SERVING_DEFAULT!r} signature takes "
                             f"{sorted(inputs)}, not 'image' (uda-export's input)")
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or "probabilities" not in outputs:
        raise SignatureError(f"{flag}={path}: its {SERVING_DEFAULT!r} signature returns "
                             f"{sorted(outputs) if isinstance(outputs, dict) else outputs}, "
                             "not 'probabilities' (uda-export's output)")
    return spec.shape.as_list()


from uda_tf.models import segmentor_from_flags  # noqa: E402  (re-exported for callers)


def export_checkpoint(checkpoint: str, export_root: str | None = None,
                      model_name: str | None = None, version: int | None = None,
                      manifest_path: str | None = None, *,
                      warmup_batch_sizes=SERVING_BATCH_SIZES) -> str:
    """Checkpoint -> SavedModel. `checkpoint` is a `.weights.h5` file, a checkpoints directory
    or a run directory; the run's config is read next to the weights (config.json, or the
    flags.cfg of a run made before it existed), the manifest from `manifest_path`, else next
    to the weights, else from the config's --data_dir. Defaults: `<run_dir>/export`, the
    run's --model_name, the next version. The export carries the config in assets.extra/."""
    from uda_tf.data.manifest import load_manifest
    weights = checkpoint
    if os.path.isdir(weights):
        nested = os.path.join(weights, "checkpoints", "best.weights.h5")
        weights = nested if os.path.isfile(nested) else os.path.join(weights, "best.weights.h5")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--checkpoint={checkpoint}: no weights file {weights}")
    ckpt_dir = os.path.dirname(os.path.abspath(weights))
    config_path = run_config_file(ckpt_dir)
    if config_path is None:
        raise FileNotFoundError(f"--checkpoint={checkpoint}: no {CONFIG_FILE} or flags.cfg "
                                f"next to it (in {ckpt_dir}); it records how the segmentor "
                                "was built")
    config = read_run_config(config_path)
    candidates = [manifest_path] if manifest_path else [ckpt_dir, config.data_dir]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            candidate = os.path.dirname(candidate)  # load_manifest takes the directory
        if candidate and os.path.isfile(os.path.join(candidate, "manifest.json")):
            manifest = load_manifest(candidate)
            break
    else:
        raise FileNotFoundError(
            f"no manifest.json for {weights}: looked in {[c for c in candidates if c]}; pass "
            "--manifest=<prepared dir or manifest.json>")
    # Where it goes is checked before the (slow) model build, and before anything is written.
    root_flag = "--export_dir" if export_root else "--export_dir (default <run_dir>/export)"
    name_flag = "--model_name" if model_name else f"--model_name of {config_path}"
    export_root = export_root or os.path.join(os.path.dirname(ckpt_dir), "export")
    model_name = model_name or config.model_name
    check_export_target(export_root, model_name, root_flag=root_flag, name_flag=name_flag)
    from uda_tf.serving.safe_load import check_weights_file
    check_weights_file(weights, "--checkpoint")
    segmentor = segmentor_from_flags(config.flag_values(), manifest)
    segmentor.load_weights(weights)
    translators = exported_networks_of(config, weights, tuple(segmentor.input_shape[1:]),
                                       "--checkpoint")
    return export_segmentor(segmentor, export_root, model_name, version, manifest=manifest,
                            config=config, warmup_batch_sizes=warmup_batch_sizes,
                            translators=translators)


def exported_networks_of(config, weights: str, input_shape, what: str) -> dict:
    """The networks the run's method exports beside its segmentor (e.g. AttENT's translators,
    for the `translate` signature), rebuilt from the run's config and loaded from the files
    its checkpoint keeps beside `weights` (training.callbacks.companion_path); {} for other
    methods. FileNotFoundError naming `what` (the flag that gave `weights`) when such a file
    is missing."""
    from uda_tf.methods import METHODS
    from uda_tf.serving.safe_load import check_weights_file
    from uda_tf.training.callbacks import companion_path
    method = METHODS.get(getattr(config, "method", None))
    if method is None:
        return {}
    builders = method.export_builders(method.configure(config.flag_values()), input_shape)
    networks = {}
    for name, build in builders.items():
        path = companion_path(weights, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}={weights}: {path} is missing: --method="
                                    f"{config.method} exports {name!r} beside the segmentor, "
                                    "from this file")
        check_weights_file(path, what)
        networks[name] = build()
        networks[name].load_weights(path)
    return networks
