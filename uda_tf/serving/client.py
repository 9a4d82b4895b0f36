"""Client for a uda_tf model behind TF Serving, over REST or gRPC.

    python -m uda_tf.serving_client --model_name=uda_demo --nifti=scan.nii.gz \
        --manifest=<SavedModel>/assets.extra/manifest.json --output=mask.nii.gz [--protocol=grpc]
    (thin script: export/client.py)

REST: POST `http://<host>:<rest_port>/v1/models/<name>[/versions/<v>]:predict` with JSON
`{"signature_name": ..., "inputs": {name: nested list}}` (columnar; the reply is
`{"outputs": {...}}`) or `{"instances": [{name: value}, ...]}` (row format; the reply is
`{"predictions": [...]}`). gRPC: `PredictionService.Predict` with a `PredictRequest` whose
inputs are TensorProtos. The network is reached only through a *transport* function, so tests
(and other servers) can stand in for it: REST transport (url, body bytes) -> reply bytes,
gRPC transport PredictRequest -> PredictResponse.

`--nifti` reads a volume, preprocesses it with the dataset's recorded parameters
(uda_tf.data.preprocess: RAS, normalise, resample, crop/pad), sends its slices in batches and
writes the label map back in the file's original geometry.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np

PROTOCOLS = ("rest", "grpc")


def predict_request(model_name: str, inputs: dict, *, signature: str = "serving_default",
                    version: int | None = None, output_filter=()):
    """A tensorflow_serving PredictRequest with `inputs` {name: array} as TensorProtos."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    request.output_filter.extend(output_filter)
    return request


def rest_body(inputs: dict, *, signature: str = "serving_default", row_format: bool = False):
    """TF Serving REST predict body. Row format lists one dict per instance (every input
    shares the batch dimension); columnar format sends each input whole."""
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    if not row_format:
        return {"signature_name": signature,
                "inputs": {name: a.tolist() for name, a in arrays.items()}}
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"row format needs one batch size for every input, got {sizes}")
    count = next(iter(sizes.values()))
    return {"signature_name": signature,
            "instances": [{name: a[i].tolist() for name, a in arrays.items()}
                          for i in range(count)]}


def decode_rest_reply(reply: dict, output_names=None) -> dict:
    """{name: array} from a REST predict reply (columnar `outputs` or row `predictions`)."""
    if "error" in reply:
        raise RuntimeError(f"TF Serving error: {reply['error']}")
    if "outputs" in reply:
        outputs = reply["outputs"]
        if not isinstance(outputs, dict):  # a single-output signature sends the bare value
            outputs = {(output_names or ["output"])[0]: outputs}
        return {name: np.asarray(value) for name, value in outputs.items()}
    if "predictions" in reply:
        rows = reply["predictions"]
        if rows and isinstance(rows[0], dict):
            return {name: np.asarray([r[name] for r in rows]) for name in rows[0]}
        return {(output_names or ["output"])[0]: np.asarray(rows)}
    raise ValueError(f"unexpected TF Serving reply keys {sorted(reply)}")


def http_transport(timeout: float):
    """POST JSON bytes with urllib (no extra dependency); an HTTP error carries TF Serving's
    JSON error message, which is raised with the URL."""
    def send(url: str, body: bytes) -> bytes:
        req = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            raise RuntimeError(f"POST {url} failed with HTTP {e.code}: {detail}") from e
        except urllib.error.URLError as e:
            raise ConnectionError(f"POST {url} failed: {e.reason}") from e
    return send


def grpc_transport(target: str, timeout: float):
    """Calls PredictionService.Predict on `target` (host:port). Message limits are raised:
    probabilities of a 64-slice batch of 96x112x4 are 11 MB, over gRPC's 4 MB default."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    options = [("grpc.max_send_message_length", 256 << 20),
               ("grpc.max_receive_message_length", 256 << 20)]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(target, options=options))
    return lambda request: stub.Predict(request, timeout=timeout)


class ServingClient:
    """Predict {name: array} -> {name: array} against one model of a TF Serving server."""

    def __init__(self, model_name: str, *, protocol: str = "rest", host: str = "localhost",
                 rest_port: int = 8501, grpc_port: int = 8500, version: int | None = None,
                 timeout: float = 60.0, row_format: bool = False, transport=None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.model_name, self.protocol, self.version = model_name, protocol, version
        self.row_format = row_format
        path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version else "")
        self.url = f"http://{host}:{rest_port}{path}:predict"
        if transport is None:
            transport = (http_transport(timeout) if protocol == "rest"
                         else grpc_transport(f"{host}:{grpc_port}", timeout))
        self.transport = transport

    def predict(self, inputs: dict, *, signature: str = "serving_default",
                outputs=("probabilities", "labels", "entropy")) -> dict:
        """`outputs` lists what the caller needs: gRPC asks the server for those only."""
        if self.protocol == "rest":
            body = json.dumps(rest_body(inputs, signature=signature,
                                        row_format=self.row_format)).encode("utf-8")
            reply = decode_rest_reply(json.loads(self.transport(self.url, body)), list(outputs))
            return {k: v for k, v in reply.items() if k in outputs}
        import tensorflow as tf
        request = predict_request(self.model_name, inputs, signature=signature,
                                  version=self.version, output_filter=outputs)
        response = self.transport(request)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def predict_slices(client: ServingClient, slices: np.ndarray, *, batch_size: int = 16,
                   signature: str = "serving_default", extra_inputs: dict | None = None):
    """Labels [N, H, W] for slices [N, H, W, C], sent `batch_size` at a time. `extra_inputs`
    holds per-slice arrays [N] sent alongside (the statistics of `serving_raw`)."""
    labels = []
    for start in range(0, len(slices), batch_size):
        batch = {"image": slices[start:start + batch_size]}
        for name, values in (extra_inputs or {}).items():
            batch[name] = values[start:start + batch_size]
        labels.append(client.predict(batch, signature=signature, outputs=("labels",))["labels"])
    return np.concatenate(labels).astype(np.uint8)


def segment_nifti(client: ServingClient, nifti_path: str, manifest: dict, output_path: str,
                  *, batch_size: int = 16, raw: bool = False) -> np.ndarray:
    """Segment one NIfTI volume through the server; writes and returns the label map in the
    file's original geometry.

    Default: preprocess here exactly as `prepare` did and call `serving_default`. `raw`:
    resample and crop/pad the raw intensities here and let `serving_raw` clip and normalise
    with the volume's statistics, sent per slice."""
    from uda_tf.data import io, preprocess
    from uda_tf.export import raw_input_names
    config = preprocess.PreprocessConfig.from_manifest(manifest["preprocessing"])
    volume = io.read_volume(nifti_path, color=config.color)
    # The same function `prepare` runs; its record holds this scan's geometry and statistics.
    prepared, _, record = preprocess.preprocess_volumes(volume, None, config)
    if raw:
        intensity = record["intensity"]
        # Geometry only (crop, resample, slice axis, pad with the clip floor); the server clips
        # and normalises. The statistics go along per slice.
        prepared = preprocess.apply_geometry(
            volume.array, volume.spacing, record, manifest["preprocessing"],
            order=preprocess.INTERPOLATIONS[config.image_interpolation],
            fill=intensity["p_low"]).astype(np.float32)
        names = raw_input_names(config.normalization)[1:]
        extra = {n: np.full([prepared.shape[2]], intensity[n], np.float32) for n in names}
        signature = "serving_raw"
    else:
        extra, signature = None, "serving_default"
    # A prepared slice is volume[:, :, k] with a channel axis (docs/CONTRACTS.md).
    slices = preprocess.slices_with_context(prepared)
    expected = tuple(manifest["image_shape"])
    if slices.shape[1:] != expected:
        raise ValueError(f"{nifti_path}: prepared slices are {slices.shape[1:]}, the model "
                         f"takes {expected}")
    labels = predict_slices(client, slices, batch_size=batch_size, signature=signature,
                            extra_inputs=extra)
    mask = preprocess.restore_to_original(np.moveaxis(labels, 0, 2), record,
                                          manifest["preprocessing"], order=0)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".partial.nii.gz"
    io.write_volume(tmp, mask.astype(np.uint8), record["original_affine"])
    os.replace(tmp, output_path)
    return mask


def define_flags():
    from absl import flags
    flags.DEFINE_string("model_name", None, "Model name in TF Serving's models.config.")
    flags.DEFINE_integer("model_version", None, "Model version (default: the server's latest).")
    flags.DEFINE_enum("protocol", "rest", list(PROTOCOLS), "REST (JSON) or gRPC.")
    flags.DEFINE_string("host", "localhost", "TF Serving host.")
    flags.DEFINE_integer("rest_port", 8501, "TF Serving REST port.")
    flags.DEFINE_integer("grpc_port", 8500, "TF Serving gRPC port.")
    flags.DEFINE_float("timeout", 60.0, "Seconds per request.")
    flags.DEFINE_string("nifti", None, "NIfTI volume to segment (writes --output as NIfTI).")
    flags.DEFINE_string("npy", None, "Preprocessed slices [N, H, W, C] float32 .npy to segment "
                        "with serving_default (writes --output as .npy labels).")
    flags.DEFINE_string("manifest", None, "manifest.json of the model's dataset (the SavedModel "
                        "carries one in assets.extra/manifest.json); needed by --nifti.")
    flags.DEFINE_string("output", None, "Where the label map goes.")
    flags.DEFINE_integer("batch_size", 16, "Slices per request.", lower_bound=1)
    flags.DEFINE_bool("raw", False, "--nifti: send raw intensities to serving_raw instead of "
                      "normalising here.")
    flags.DEFINE_bool("row_format", False, "REST: send 'instances' rows instead of 'inputs'.")
    flags.mark_flags_as_required(["model_name", "output"])


def _read_manifest(path: str) -> dict:
    if not path:
        raise SystemExit("--nifti needs --manifest (e.g. <SavedModel>/assets.extra/manifest.json)")
    path = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--manifest={path}: cannot read it: {e}") from e


def main(argv):
    import grpc
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.nifti) == bool(FLAGS.npy):
        raise SystemExit("give exactly one of --nifti and --npy")
    client = ServingClient(FLAGS.model_name, protocol=FLAGS.protocol, host=FLAGS.host,
                           rest_port=FLAGS.rest_port, grpc_port=FLAGS.grpc_port,
                           version=FLAGS.model_version, timeout=FLAGS.timeout,
                           row_format=FLAGS.row_format)
    try:
        if FLAGS.nifti:
            mask = segment_nifti(client, FLAGS.nifti, _read_manifest(FLAGS.manifest),
                                 FLAGS.output, batch_size=FLAGS.batch_size, raw=FLAGS.raw)
            counts = dict(zip(*np.unique(mask, return_counts=True)))
            print(f"wrote {FLAGS.output}: shape {mask.shape}, voxels per label "
                  f"{ {int(k): int(v) for k, v in counts.items()} }")
            return
        if not os.path.isfile(FLAGS.npy):
            raise SystemExit(f"--npy={FLAGS.npy}: no such file")
        images = np.load(FLAGS.npy, allow_pickle=False)  # arrays only, never pickles
        labels = predict_slices(client, images.astype(np.float32),
                                batch_size=FLAGS.batch_size)
    except grpc.RpcError as e:
        raise SystemExit(f"gRPC {FLAGS.host}:{FLAGS.grpc_port} failed: {e.code()} "
                         f"{e.details()}") from e
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise SystemExit(f"client failed: {e}") from e
    np.save(FLAGS.output, labels)
    print(f"wrote {FLAGS.output}: labels {labels.shape}")


def run():
    from absl import app
    define_flags()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
