"""The serving client up to the wire: its REST JSON and gRPC PredictRequests are decoded the
way TF Serving decodes them and fed to the exported SavedModel in-process (the model-server
binary is not available here), and --nifti writes masks in the original geometry."""
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import LPS_CASE, make_msd
from uda_tf.serving.export import export_segmentor
from uda_tf.serving.client import ServingClient, predict_slices, segment_nifti


@pytest.fixture(scope="module")
def served(tiny_prepared, tmp_path_factory):
    """A random tiny segmentor for the tiny dataset's 16x24 slices, exported with its
    manifest, loaded as TF Serving would load it."""
    import keras

    from uda_tf.models.unet import residual_unet_2d
    data_dir, manifest = tiny_prepared
    keras.utils.set_random_seed(4)
    model = residual_unet_2d(tuple(manifest["image_shape"]), manifest["num_classes"],
                             base_filters=4)
    path = export_segmentor(model, str(tmp_path_factory.mktemp("served")), "tiny",
                            manifest=manifest)
    return tf.saved_model.load(path), manifest, data_dir


def fake_rest_server(loaded, calls):
    """Decodes a REST predict body as TF Serving does and replies in its format."""
    def transport(url, body):
        request = json.loads(body)
        calls.append((url, request))
        fn = loaded.signatures[request.get("signature_name", "serving_default")]
        if "instances" in request:
            rows = request["instances"]
            inputs = {k: np.asarray([r[k] for r in rows], np.float32) for k in rows[0]}
        else:
            inputs = {k: np.asarray(v, np.float32) for k, v in request["inputs"].items()}
        out = {k: v.numpy().tolist() for k, v in fn(**inputs).items()}
        if "instances" in request:
            n = len(request["instances"])
            reply = {"predictions": [{k: v[i] for k, v in out.items()} for i in range(n)]}
        else:
            reply = {"outputs": out}
        return json.dumps(reply).encode()
    return transport


def fake_grpc_server(loaded, calls):
    """Reads a PredictRequest off the wire (bytes), runs it, answers a PredictResponse."""
    from tensorflow_serving.apis import predict_pb2

    def transport(request):
        request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
        calls.append(request)
        fn = loaded.signatures[request.model_spec.signature_name]
        out = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        response = predict_pb2.PredictResponse()
        for name in request.output_filter or out:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(out[name].numpy()))
        return response
    return transport


def slices(n, seed=0):
    return np.random.default_rng(seed).random((n, 16, 24, 1), dtype=np.float32)


@pytest.mark.parametrize("row_format", [False, True])
def test_rest_request_gives_the_models_masks(served, row_format):
    loaded, _, _ = served
    calls = []
    client = ServingClient("tiny", host="srv", rest_port=9001, version=1, row_format=row_format,
                           transport=fake_rest_server(loaded, calls))
    x = slices(5)
    out = client.predict({"image": x})
    expected = loaded.signatures["serving_default"](image=tf.constant(x))
    np.testing.assert_array_equal(out["labels"], expected["labels"].numpy())
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"].numpy(),
                               atol=1e-6)
    url, body = calls[0]
    assert url == "http://srv:9001/v1/models/tiny/versions/1:predict"
    assert body["signature_name"] == "serving_default"
    assert set(body) == {"signature_name", "instances" if row_format else "inputs"}


def test_rest_raw_signature_and_batching(served):
    loaded, _, _ = served
    calls = []
    client = ServingClient("tiny", transport=fake_rest_server(loaded, calls))
    x = 300 + 500 * slices(7, seed=1)
    stats = {"p_low": np.full([7], 350, np.float32), "p_high": np.full([7], 700, np.float32)}
    labels = predict_slices(client, x, batch_size=3, signature="serving_raw",
                            extra_inputs=stats)
    assert [len(body["inputs"]["image"]) for _, body in calls] == [3, 3, 1]
    assert set(calls[0][1]["inputs"]) == {"image", "p_low", "p_high"}
    by_hand = (np.clip(x, 350, 700) - 350) / 350
    expected = loaded.signatures["serving_default"](image=tf.constant(by_hand, tf.float32))
    np.testing.assert_array_equal(labels, expected["labels"].numpy())


def test_grpc_request_gives_the_models_masks(served):
    loaded, _, _ = served
    calls = []
    client = ServingClient("tiny", protocol="grpc", version=3,
                           transport=fake_grpc_server(loaded, calls))
    x = slices(4, seed=2)
    labels = predict_slices(client, x, batch_size=4)
    request = calls[0]
    assert request.model_spec.name == "tiny" and request.model_spec.version.value == 3
    assert request.model_spec.signature_name == "serving_default"
    assert list(request.output_filter) == ["labels"]
    assert tf.make_ndarray(request.inputs["image"]).dtype == np.float32
    expected = loaded.signatures["serving_default"](image=tf.constant(x))["labels"].numpy()
    np.testing.assert_array_equal(labels, expected)


def test_real_transports_over_loopback(served):
    """The default transports (urllib POST, gRPC stub) against loopback servers that answer
    with the fake handlers above: the bytes on the wire are what TF Serving would get."""
    import threading
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    loaded, _, _ = served
    rest_calls, grpc_calls = [], []
    rest_handler = fake_rest_server(loaded, rest_calls)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            reply = rest_handler(f"http://{self.headers['Host']}{self.path}", body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return fake_grpc_server(loaded, grpc_calls)(request)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        x = slices(3, seed=5)
        expected = loaded.signatures["serving_default"](image=tf.constant(x))["labels"].numpy()
        rest = ServingClient("tiny", host="127.0.0.1", rest_port=http.server_address[1],
                             timeout=30)
        np.testing.assert_array_equal(predict_slices(rest, x), expected)
        assert rest_calls[0][0].endswith("/v1/models/tiny:predict")
        grpc_client = ServingClient("tiny", protocol="grpc", host="127.0.0.1",
                                    grpc_port=grpc_port, timeout=30)
        np.testing.assert_array_equal(predict_slices(grpc_client, x), expected)
        assert len(grpc_calls) == 1
    finally:
        http.shutdown()
        server.stop(None)


@pytest.mark.parametrize("case", ["a_000", LPS_CASE])
def test_nifti_mask_in_original_geometry(served, tmp_path, case):
    """The client's mask equals the model's prediction on the slices `prepare` wrote, restored
    to the file's grid; raw mode (normalisation inside the graph) agrees."""
    from uda_tf.data import preprocess
    from uda_tf.data.pipeline import eval_dataset
    loaded, manifest, data_dir = served
    raw = make_msd(tmp_path / "raw")  # the same files the tiny_prepared fixture prepared
    nifti = str(raw / "imagesTr" / f"{case}_0000.nii.gz")
    record = manifest["cases"][case]
    grpc_calls = []
    client = ServingClient("tiny", protocol="grpc", transport=fake_grpc_server(loaded, grpc_calls))
    out = str(tmp_path / "mask.nii.gz")
    mask = segment_nifti(client, nifti, manifest, out, batch_size=4)

    serve = loaded.signatures["serving_default"]
    by_index = {}
    for batch in eval_dataset(data_dir, manifest, record["domain"], record["split"],
                              batch_size=64, with_metadata=True):
        labels = serve(image=batch["image"])["labels"].numpy()
        for i, c in enumerate(batch["case_id"].numpy()):
            if c.decode() == case:
                by_index[int(batch["slice_index"][i])] = labels[i]
    prepared_pred = np.stack([by_index[k] for k in range(record["num_slices"])], axis=-1)
    expected = preprocess.restore_to_original(prepared_pred, record, manifest["preprocessing"])
    np.testing.assert_array_equal(mask, expected)
    assert len(grpc_calls) == -(-record["num_slices"] // 4)

    written, source = nib.load(out), nib.load(nifti)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)

    raw_mask = segment_nifti(ServingClient("tiny", transport=fake_rest_server(loaded, [])),
                             nifti, manifest, str(tmp_path / "raw_mask.nii.gz"), raw=True)
    # Equal where prepare's clip-then-resample and the graph's resample-then-clip agree: on
    # a grid that needs no resampling, everywhere.
    agreement = (raw_mask == expected).mean()
    if case == "a_000":
        assert agreement == 1.0
    else:
        assert agreement > 0.98


def test_serving_configs_match_the_export():
    """models.config is a valid ModelServerConfig; the allowed batch sizes of batching.config
    are the sizes the export warms up, and the largest is max_batch_size."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from uda_tf.serving.export import SERVING_BATCH_SIZES
    serving = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "export", "serving")
    with open(os.path.join(serving, "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == "uda_demo" and model.base_path == "/models/uda_demo"
    with open(os.path.join(serving, "batching.config")) as f:
        text = f.read()
    allowed = tuple(int(v) for v in re.findall(r"^allowed_batch_sizes: (\d+)", text, re.M))
    assert allowed == SERVING_BATCH_SIZES
    largest = re.search(r"^max_batch_size \{ value: (\d+) \}", text, re.M).group(1)
    assert int(largest) == allowed[-1]
