"""SavedModel export: the signatures TF Serving and the client rely on, the raw-intensity
signature, assets, warm-up records, and export from a checkpoint directory."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, SHAPE, tiny_segmentor
from uda_tf.data.preprocess import normalize_intensity
from uda_tf.serving.export import (WARMUP_FILE, export_checkpoint, export_segmentor, load_serving_fn,
                           next_version, normalize_raw)

MANIFEST = {"image_shape": list(SHAPE), "num_classes": len(CLASS_NAMES),
            "label_names": {str(i): n for i, n in enumerate(CLASS_NAMES)},
            "preprocessing": {"normalization": "minmax", "clip_percentiles": [1.0, 99.0]}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny segmentor's checkpoint directory as train.py leaves it (weights, flags.cfg,
    manifest), exported the way `uda-export` does."""
    from uda_tf.data.manifest import write_manifest
    run_dir = tmp_path_factory.mktemp("run")
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir()
    model = tiny_segmentor(seed=3, depth=3)  # as --model=unet2d builds it (flags)
    model.save_weights(str(ckpt / "best.weights.h5"))
    (ckpt / "flags.cfg").write_text("# resolved flags\n--base_filters=4\n--norm=instance\n"
                                    "--model_name=tiny\n--noaugment\n")
    manifest = write_manifest(str(ckpt), MANIFEST)  # stamped, as prepare writes it
    path = export_checkpoint(str(run_dir), warmup_batch_sizes=(1, 3))
    # saved_model_cli starts TensorFlow (seconds): let it run while the other tests do.
    cli = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "show", "--all",
         "--dir", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    yield SimpleNamespace(model=model, path=path, loaded=tf.saved_model.load(path),
                          manifest=manifest, cli=cli)
    cli.kill()


def test_saved_model_matches_in_memory_model(exported):
    model, path = exported.model, exported.path
    assert path.endswith(os.path.join("run0", "export", "tiny", "1"))
    model_dir = os.path.dirname(path)
    assert os.listdir(model_dir) == ["1"]  # the temporary directory was renamed
    assert next_version(model_dir) == 2
    with pytest.raises(FileExistsError, match="1"):
        export_segmentor(model, os.path.dirname(model_dir), "tiny", version=1)

    serve = load_serving_fn(path)
    x = np.random.default_rng(0).random((5, *SHAPE), dtype=np.float32)
    out = serve(image=tf.constant(x))
    expected = tf.nn.softmax(model(x, training=False)["logits"]).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(out["labels"].numpy(), expected.argmax(-1))
    ent = out["entropy"].numpy()
    assert ent.shape == (5, 16, 16) and ent.min() >= 0 and ent.max() <= 1 + 1e-6


def test_export_errors_name_what_is_missing(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        export_checkpoint(str(tmp_path))
    (ckpt / "best.weights.h5").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="flags.cfg"):
        export_checkpoint(str(ckpt / "best.weights.h5"))
    (ckpt / "flags.cfg").write_text("--base_filters=4\n--norm=instance\n"
                                    "--data_dir=/no/such/prepared\n")
    with pytest.raises(FileNotFoundError, match="/no/such/prepared"):
        export_checkpoint(str(tmp_path))


def test_signatures_names_dtypes_shapes(exported):
    loaded = exported.loaded
    assert set(loaded.signatures) == {"serving_default", "serving_raw"}
    outputs = {"probabilities": (tf.float32, [None, 16, 16, 3]),
               "labels": (tf.int32, [None, 16, 16]), "entropy": (tf.float32, [None, 16, 16])}
    inputs = {"serving_default": {"image": (tf.float32, [None, 16, 16, 1])},
              "serving_raw": {"image": (tf.float32, [None, 16, 16, 1]),
                              "p_low": (tf.float32, [None]), "p_high": (tf.float32, [None])}}
    for name, expected_inputs in inputs.items():
        fn = loaded.signatures[name]
        args, kwargs = fn.structured_input_signature
        assert args == ()
        assert {k: (s.dtype, s.shape.as_list()) for k, s in kwargs.items()} == expected_inputs
        assert {k: (s.dtype, s.shape.as_list())
                for k, s in fn.structured_outputs.items()} == outputs


def test_raw_signature_equals_normalising_by_hand(exported):
    loaded = exported.loaded
    rng = np.random.default_rng(1)
    volume = (200 + 800 * rng.random((16, 16, 6))).astype(np.float32)  # raw intensities
    normalized, stats = normalize_intensity(volume, (1.0, 99.0), "minmax")
    raw_slices = np.moveaxis(volume, 2, 0)[..., None]
    per_slice = {k: tf.fill([6], np.float32(stats[k])) for k in ("p_low", "p_high")}
    raw = loaded.signatures["serving_raw"](image=tf.constant(raw_slices), **per_slice)
    by_hand = loaded.signatures["serving_default"](
        image=tf.constant(np.moveaxis(normalized, 2, 0)[..., None]))
    for name in ("probabilities", "entropy"):
        np.testing.assert_allclose(raw[name].numpy(), by_hand[name].numpy(), atol=1e-5)
    np.testing.assert_array_equal(raw["labels"].numpy(), by_hand["labels"].numpy())


@pytest.mark.parametrize("normalization", ["minmax", "zscore"])
def test_in_graph_normalisation_matches_prepare(normalization):
    volume = np.random.default_rng(2).normal(50, 20, (8, 8, 3)).astype(np.float32)
    expected, stats = normalize_intensity(volume, (1.0, 99.0), normalization)
    slices = np.moveaxis(volume, 2, 0)[..., None]
    got = normalize_raw(tf.constant(slices), {k: tf.fill([3], np.float32(v))
                                              for k, v in stats.items()}, normalization)
    np.testing.assert_allclose(got.numpy(), np.moveaxis(expected, 2, 0)[..., None], atol=1e-5)


def test_saved_model_cli_shows_it(exported):
    stdout, stderr = exported.cli.communicate(timeout=120)
    assert exported.cli.returncode == 0, stderr[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['serving_raw']",
                 "inputs['p_low']", "outputs['labels']", "dtype: DT_INT32"):
        assert text in stdout


def test_assets_and_warmup_requests_run(exported):
    from tensorflow_serving.apis import prediction_log_pb2
    path, loaded = exported.path, exported.loaded
    extra = os.path.join(path, "assets.extra")
    assert json.load(open(os.path.join(extra, "manifest.json"))) == exported.manifest
    assert json.load(open(os.path.join(extra, "label_names.json"))) == MANIFEST["label_names"]
    # the run's config, read from the old run's flags.cfg, travels with the export
    from uda_tf.training.config import RunConfig
    config = RunConfig.load(os.path.join(extra, "config.json"))
    assert (config.base_filters, config.norm, config.model_name) == (4, "instance", "tiny")
    seen = []
    for record in tf.data.TFRecordDataset(os.path.join(extra, WARMUP_FILE)):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        assert request.model_spec.name == "tiny"
        signature = request.model_spec.signature_name
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[signature](**inputs)
        batch = inputs["image"].shape[0]
        assert out["labels"].shape == (batch, 16, 16)
        seen.append((signature, batch))
    assert sorted(seen) == [("serving_default", 1), ("serving_default", 3),
                            ("serving_raw", 1), ("serving_raw", 3)]


def test_export_reads_the_runs_config_json_before_its_flags_cfg(tmp_path):
    """A run's checkpoints/ holds config.json (and flags.cfg for people): the export builds the
    segmentor config.json describes and names its model after it."""
    from uda_tf.data.manifest import write_manifest
    from uda_tf.training.config import RunConfig
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    tiny_segmentor(seed=4, depth=3).save_weights(str(ckpt / "best.weights.h5"))
    config = RunConfig.from_flags({"base_filters": 4, "norm": "instance",
                                   "model_name": "from_json"})
    config.save(str(ckpt / "config.json"))
    (ckpt / "flags.cfg").write_text("--base_filters=8\n--norm=batch\n--model_name=stale\n")
    write_manifest(str(ckpt), MANIFEST)
    path = export_checkpoint(str(tmp_path), warmup_batch_sizes=(1,))
    assert path.endswith(os.path.join("export", "from_json", "1"))
    assert RunConfig.load(os.path.join(path, "assets.extra", "config.json")) == config
