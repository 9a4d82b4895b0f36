"""SavedModel export of the segmentor for TF Serving.

Layout `<export_root>/<model_name>/<version>/` is the one TF Serving watches. The
`serving_default` signature takes a batch of preprocessed slices named `image`
[N, H, W, C] float32 and returns `probabilities` [N, H, W, K], `labels` [N, H, W] int32 and
`entropy` [N, H, W] (normalised to [0, 1]). Only the segmentor is exported, never the
adversarial wrapper (shared/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
import shutil

import keras
import tensorflow as tf

from uda_tf.losses import entropy_map


def next_version(model_dir: str) -> int:
    """TF Serving versions are integers; a new export takes the next free one."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def export_segmentor(segmentor: keras.Model, export_root: str, model_name: str,
                     version: int | None = None) -> str:
    """Write the SavedModel atomically (temporary directory, then rename); returns its path."""
    model_dir = os.path.join(export_root, model_name)
    version = next_version(model_dir) if version is None else int(version)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version already exists: {final}")
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".{version}.partial")
    shutil.rmtree(tmp, ignore_errors=True)

    height, width, channels = segmentor.input_shape[1:]
    spec = tf.TensorSpec([None, height, width, channels], tf.float32, name="image")

    def serve(image):
        logits = segmentor(image, training=False)["logits"]
        probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        return {"probabilities": probs,
                "labels": tf.argmax(probs, axis=-1, output_type=tf.int32),
                "entropy": entropy_map(probs)}

    archive = keras.export.ExportArchive()
    archive.track(segmentor)
    archive.add_endpoint("serving_default", serve, input_signature=[spec])
    archive.write_out(tmp, verbose=False)
    os.replace(tmp, final)
    return final


def load_serving_fn(path: str):
    """The `serving_default` signature of a SavedModel, as a callable image -> dict."""
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    fn._loaded = loaded  # keep the object (and its variables) alive with the function
    return fn
