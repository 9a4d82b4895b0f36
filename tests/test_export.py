import numpy as np
import tensorflow as tf

from tests.helpers import tiny_segmentor
from uda_tf.export import export_segmentor, load_serving_fn


def test_saved_model_matches_in_memory_model(tmp_path):
    model = tiny_segmentor(seed=3)
    path = export_segmentor(model, str(tmp_path), "tiny")
    assert path == str(tmp_path / "tiny" / "1")
    assert export_segmentor(model, str(tmp_path), "tiny").endswith("/2")  # next version

    serve = load_serving_fn(path)
    _, kwargs = serve.structured_input_signature
    assert list(kwargs) == ["image"]
    assert kwargs["image"].shape.as_list() == [None, 16, 16, 1]
    assert kwargs["image"].dtype == tf.float32

    x = np.random.default_rng(0).random((5, 16, 16, 1), dtype=np.float32)
    out = serve(image=tf.constant(x))
    assert set(out) == {"probabilities", "labels", "entropy"}
    expected = tf.nn.softmax(model(x, training=False)["logits"]).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(out["labels"].numpy(), expected.argmax(-1))
    assert out["labels"].dtype == tf.int32
    ent = out["entropy"].numpy()
    assert ent.shape == (5, 16, 16) and ent.min() >= 0 and ent.max() <= 1 + 1e-6
    assert not list(tmp_path.glob("tiny/.*partial"))
