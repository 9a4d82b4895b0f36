"""Only weights files and SavedModels load: a .keras model with a Lambda layer (code run at
load time) is refused by every path that takes a user-given model file, renamed or not."""
import os
import shutil

import keras
import pytest

from uda_tf.serving.export import export_checkpoint
from uda_tf.serving.safe_load import check_weights_file


@pytest.fixture
def lambda_model_file(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = str(tmp_path / "evil.keras")
    keras.Model(inputs, outputs).save(path)
    return path


def test_lambda_keras_file_is_refused_everywhere(lambda_model_file, tiny_prepared, tmp_path):
    data_dir, _ = tiny_prepared
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "flags.cfg").write_text("--base_filters=2\n--norm=instance\n")
    shutil.copy(os.path.join(data_dir, "manifest.json"), run / "manifest.json")
    as_keras = str(run / "best.keras")
    shutil.copy(lambda_model_file, as_keras)
    with pytest.raises(ValueError, match=r"--checkpoint=.*best\.keras: only \.weights\.h5"):
        export_checkpoint(as_keras)
    renamed = str(run / "best.weights.h5")
    shutil.copy(lambda_model_file, renamed)  # a .keras archive behind a weights name
    with pytest.raises(ValueError, match=r"zip archive .* refused"):
        export_checkpoint(renamed)
    from uda_tf.evaluation.predict import load_predictor
    with pytest.raises(ValueError, match=r"--model=.*zip archive"):
        load_predictor(renamed)
    assert not (tmp_path / "run" / "export").exists()
    # Keras' own loader stays in safe mode (nothing in uda_tf turns it off).
    with pytest.raises(ValueError, match="Lambda"):
        keras.saving.load_model(lambda_model_file)


def test_real_weights_pass(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    assert check_weights_file(path, "--model") == path
