"""MLflow pyfunc model that serves a uda_tf SavedModel's `serving_default` signature.

A "models from code" file (MLflow's recommended way to log a custom model): MLflow copies this
file into the logged model and runs it at load time, so loading needs tensorflow, numpy and
mlflow but not uda_tf, and nothing is pickled. The SavedModel directory travels as the model's
`saved_model` artifact. Logged by `uda_tf.training.tracking.log_saved_model`; not imported by
the package.

    model = mlflow.pyfunc.load_model("models:/<name>@<alias>")
    out = model.predict(images)    # [N, H, W, C] float32 preprocessed slices
    out["labels"], out["probabilities"], out["entropy"]
"""
import mlflow
import numpy as np


class SavedModelPyfunc(mlflow.pyfunc.PythonModel):
    """predict(images [N, H, W, C]) -> {"probabilities", "labels", "entropy"} arrays."""

    def load_context(self, context):
        import tensorflow as tf
        path = context.artifacts["saved_model"]
        self._loaded = tf.saved_model.load(path)
        if "serving_default" not in self._loaded.signatures:
            raise ValueError(f"SavedModel {path} has no 'serving_default' signature; it has "
                             f"{sorted(self._loaded.signatures) or 'none'}")
        self._serve = self._loaded.signatures["serving_default"]

    # The np.ndarray hint is one MLflow accepts without inferring a schema from it (the logged
    # signature describes the tensors); without a hint MLflow warns at every load.
    def predict(self, context, model_input: np.ndarray, params=None):
        import tensorflow as tf
        if isinstance(model_input, dict):  # {"image": array}, as TF Serving's inputs
            model_input = model_input["image"]
        outputs = self._serve(image=tf.constant(np.asarray(model_input, np.float32)))
        return {k: v.numpy() for k, v in outputs.items()}


mlflow.models.set_model(SavedModelPyfunc())
