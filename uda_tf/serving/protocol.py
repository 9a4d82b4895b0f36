"""What travels between a client and TF Serving, shared by the export (warm-up requests it
writes into the SavedModel) and the client (requests it sends): PredictRequests, REST bodies and
replies, and the inputs each serving signature takes."""
from __future__ import annotations

import numpy as np


def raw_input_names(normalization: str) -> tuple[str, ...]:
    """Inputs of `serving_raw`: TF Serving requires every input of a signature, so zscore
    models take `mean` and `std` and minmax models do not."""
    if normalization == "minmax":
        return ("image", "p_low", "p_high")
    if normalization == "zscore":
        return ("image", "p_low", "p_high", "mean", "std")
    raise ValueError(f"manifest preprocessing.normalization must be minmax or zscore, "
                     f"got {normalization!r}")


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
