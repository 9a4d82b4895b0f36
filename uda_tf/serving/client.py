"""Client for a uda_tf model behind TF Serving, over REST or gRPC.

    python -m uda_tf.cli.serve_client --model_name=uda_demo --nifti=scan.nii.gz \
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
import urllib.error
import urllib.request

import numpy as np

from uda_tf.data.manifest import Manifest
from uda_tf.files import atomic_write
from uda_tf.serving.protocol import decode_rest_reply, predict_request, raw_input_names, rest_body

PROTOCOLS = ("rest", "grpc")


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


def segment_nifti(client: ServingClient, nifti_path: str, manifest: Manifest, output_path: str,
                  *, batch_size: int = 16, raw: bool = False) -> np.ndarray:
    """Segment one NIfTI volume through the server; writes and returns the label map in the
    file's original geometry.

    Default: preprocess here exactly as `prepare` did and call `serving_default`. `raw`:
    resample and crop/pad the raw intensities here and let `serving_raw` clip and normalise
    with the volume's statistics, sent per slice."""
    from uda_tf.data import io, preprocess
    manifest = Manifest.of(manifest)  # as read from an export's assets, or a Manifest
    config = preprocess.PreprocessConfig.from_manifest(manifest.preprocessing)
    channels = manifest.image_shape[-1] // (2 * manifest.context_slices + 1)
    if channels > 1 and not io.is_picture(nifti_path):
        raise ValueError(f"{nifti_path}: the model takes {channels} channels (a multi-channel "
                         "dataset); this client sends one NIfTI file: use python -m "
                         "uda_tf.cli.predict, which reads every channel's file")
    volume = io.read_volume(nifti_path, color=config.color)
    # The same function `prepare` runs; its record holds this scan's geometry and statistics.
    prepared, _, record = preprocess.preprocess_volumes(volume, None, config)
    if raw:
        intensity = record["intensity"]
        # Geometry only (crop, resample, slice axis, pad with the clip floor); the server clips
        # and normalises. The statistics go along per slice.
        prepared = preprocess.apply_geometry(
            volume.array, volume.spacing, record, manifest.preprocessing,
            order=preprocess.INTERPOLATIONS[config.image_interpolation],
            fill=intensity["p_low"]).astype(np.float32)
        names = raw_input_names(config.normalization)[1:]
        extra = {n: np.full([prepared.shape[2]], intensity[n], np.float32) for n in names}
        signature = "serving_raw"
    else:
        extra, signature = None, "serving_default"
    # A prepared slice is volume[:, :, k] with a channel axis (docs/CONTRACTS.md).
    slices = preprocess.slices_with_context(prepared)
    expected = tuple(manifest.image_shape)
    if slices.shape[1:] != expected:
        raise ValueError(f"{nifti_path}: prepared slices are {slices.shape[1:]}, the model "
                         f"takes {expected}")
    labels = predict_slices(client, slices, batch_size=batch_size, signature=signature,
                            extra_inputs=extra)
    mask = preprocess.restore_to_original(np.moveaxis(labels, 0, 2), record,
                                          manifest.preprocessing, order=0)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with atomic_write(output_path, None) as tmp:
        io.write_volume(tmp, mask.astype(np.uint8), record["original_affine"])
    return mask
