"""export, predict and evaluate refuse what would lose or misplace a user's files, and name
what is wrong: names that escape their root, outputs over inputs or ground truth, a second
writer, clashing case files, damaged shards, SavedModels without `serving_default`, models
whose input does not fit the data; the CLIs print `<prog>: error: ...` and exit 1."""
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from tests import cli_runner
from uda_tf.files import BadNameError, OutputLockedError

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")


def run_cli(module, *args):
    """The command line in this process (tests/cli_runner.py)."""
    return cli_runner.run_cli(module, args)


def run_process(module, *args):
    """The command line in a new process, as a user starts it."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=180, env=ENV)


def assert_cli_error(done, prog, *texts):
    """Exit status 1, `<prog>: error: ...` naming every text, and no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout[-1000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{prog}: error: " in done.stderr, done.stderr[-2000:]
    for text in texts:
        assert text in done.stderr, (text, done.stderr[-2000:])


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def conv_model(shape, seed=0):
    """A 1x1-convolution 'segmentor' (2 classes) taking inputs of `shape`."""
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    return keras.Model(inputs, {"logits": keras.layers.Conv2D(2, 1)(inputs)})


class FlockHolder:
    """Another process holding `<directory>/.uda_tf.lock` (OutputLock is re-entrant within
    this process, so the second writer must be a different process)."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        code = textwrap.dedent(f"""
            import fcntl, json, os, sys, time
            fd = os.open({os.path.join(str(directory), '.uda_tf.lock')!r},
                         os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({{"pid": os.getpid(), "host": "h",
                                      "command": "holder", "since": "now"}}).encode())
            print("locked", flush=True)
            time.sleep(60)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# -- export -----------------------------------------------------------------------------------
MANIFEST = {"image_shape": [16, 24, 1], "num_classes": 2,
            "label_names": {"0": "background", "1": "fg"},
            "preprocessing": {"normalization": "minmax", "clip_percentiles": [1.0, 99.0]}}


def fake_run(root, model_name=None):
    """A run's checkpoints directory whose weights are not even HDF5: every check below must
    refuse before the weights are read (and before anything is written)."""
    from uda_tf.data.manifest import write_manifest
    ckpt = root / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "best.weights.h5").write_bytes(b"not hdf5")
    flags = "--base_filters=2\n--norm=instance\n"
    if model_name:
        flags += f"--model_name={model_name}\n"
    (ckpt / "flags.cfg").write_text(flags)
    write_manifest(str(ckpt), MANIFEST)
    return ckpt


def test_export_model_name_must_be_a_plain_name(tmp_path):
    from uda_tf.serving.export import export_checkpoint, export_segmentor
    ckpt = fake_run(tmp_path)
    export_root = tmp_path / "a" / "b" / "exports"
    with pytest.raises(BadNameError, match=r"--model_name='\.\./\.\./x'"):
        export_checkpoint(str(ckpt), str(export_root), "../../x")
    # The run's own --model_name (flags.cfg) is checked the same way, naming the file.
    ckpt2 = fake_run(tmp_path / "second", model_name="../escaped")
    with pytest.raises(BadNameError, match="flags.cfg"):
        export_checkpoint(str(ckpt2), str(export_root))
    # The library call is guarded too (train.py calls it with its --model_name).
    with pytest.raises(BadNameError, match="--model_name"):
        export_segmentor(conv_model((16, 24, 1)), str(export_root), "../x")
    assert not os.path.exists(tmp_path / "a" / "x") and not os.path.exists(tmp_path / "a" / "b"
                                                                             / "x")
    assert not os.path.exists(export_root)  # nothing was created


def test_export_dir_that_is_a_file_is_named(tmp_path):
    from uda_tf.serving.export import export_checkpoint
    ckpt = fake_run(tmp_path)
    a_file = tmp_path / "exports.txt"
    a_file.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"--export_dir={a_file} is a file"):
        export_checkpoint(str(ckpt), str(a_file), "tiny")
    assert a_file.read_text() == "mine"


def test_export_is_one_writer_and_never_replaces_a_version(tmp_path, monkeypatch):
    from uda_tf.serving import export
    model = conv_model((16, 24, 1))
    model_dir = tmp_path / "exports" / "tiny"
    with FlockHolder(model_dir):
        with pytest.raises(OutputLockedError, match="export: .* is being written by pid"):
            export.export_segmentor(model, str(tmp_path / "exports"), "tiny",
                                    warmup_batch_sizes=(1,))
    assert os.listdir(model_dir) == [".uda_tf.lock"]  # the holder's (killed) only: no version
    # The lock file and a hidden partial export are no versions.
    (model_dir / "3").mkdir()
    (model_dir / ".7.partial").mkdir()
    assert export.next_version(str(model_dir)) == 4
    os.remove(model_dir / ".uda_tf.lock")

    # Version 4 appears (empty, made by something that ignores the lock) while the export
    # writes: rename(2) would silently replace an empty directory; the export must refuse.
    real = export.write_warmup_requests

    def racing(*args, **kwargs):
        (model_dir / "4").mkdir()
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "write_warmup_requests", racing)
    with pytest.raises(OSError, match="already exists"):
        export.export_segmentor(model, str(tmp_path / "exports"), "tiny",
                                warmup_batch_sizes=(1,))
    assert os.listdir(model_dir / "4") == []  # left as it was, not replaced by the export
    # Its own partial directory is removed, no lock is left; the unrelated .7.partial stays.
    assert sorted(os.listdir(model_dir)) == [".7.partial", "3", "4"]


def test_export_cli_errors_are_named(tmp_path):
    ckpt = fake_run(tmp_path)
    done = run_process("uda_tf.cli.export", f"--checkpoint={ckpt}", f"--export_dir={tmp_path}/e",
                   "--model_name=../../x")
    assert_cli_error(done, "export", "--model_name='../../x' must be a plain model name")
    assert not os.path.exists(tmp_path / "e")


# -- predict ----------------------------------------------------------------------------------
def voxelwise(batch):
    p = 1.0 / (1.0 + np.exp(-8.0 * (batch[..., :1] - 0.5)))
    return np.concatenate([1.0 - p, p], axis=-1)


def slice_predictor(size=(16, 16)):
    """A Predictor of 2D slices whose 'model' thresholds each voxel (no TensorFlow)."""
    from uda_tf.data.preprocess import PreprocessConfig
    from uda_tf.evaluation.predict import Predictor
    config = PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=size, clip_percentiles=(0.0, 100.0))
    manifest = {"preprocessing": config.to_manifest(), "image_shape": [*size, 1],
                "output": {"records": "slices", "context_slices": 0}}
    return Predictor(voxelwise, manifest)


def write_scan(path, seed=0, affine=None):
    rng = np.random.default_rng(seed)
    image = (100 * rng.random((10, 12, 6))).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None
                             else affine), str(path))
    return str(path)


@pytest.fixture
def dataset(tmp_path):
    """An nnU-Net-style dataset: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz,
    imagesTs/<case>_0000.nii.gz, dataset.json."""
    from tests.helpers import make_msd
    root = make_msd(tmp_path / "Dataset")
    write_scan(root / "imagesTs" / "t_000_0000.nii.gz")
    labels = {p: digest(p) for p in (root / "labelsTr").iterdir()}
    return root, labels


def test_predict_refuses_to_write_over_inputs_or_ground_truth(dataset, tmp_path):
    from uda_tf.evaluation.predict import predict_cases, resolve_inputs
    refused = ValueError  # predict.OutputWouldReplaceInputError
    root, labels = dataset
    predictor = slice_predictor()
    quiet = {"say": lambda *_: None}
    # --input=imagesTr/*_0000.nii.gz --output_dir=labelsTr: <case>.nii.gz are the labels.
    cases = resolve_inputs([str(root / "imagesTr" / "*_0000.nii.gz")])[:2]
    with pytest.raises(refused, match=r"--output_dir=.*labelsTr.*"
                       r"--overwrite_input_files"):
        predict_cases(predictor, cases, str(root / "labelsTr"), **quiet)
    # --layout=msd --input_dir=<root>: its labels folder, its images folders (and folders
    # inside them) are refused; the input folder of plain --input scans too.
    for out in (root / "labelsTr", root / "imagesTr" / "preds", root / "imagesTs"):
        with pytest.raises(refused, match=f"--output_dir={out}"):
            predict_cases(predictor, cases, str(out), layout="msd", input_dir=str(root),
                          **quiet)
    scans = [("scan", write_scan(tmp_path / "scans" / "scan.nii.gz"))]
    with pytest.raises(refused, match="input scan"):
        predict_cases(predictor, scans, str(tmp_path / "scans"), **quiet)
    # The same through a symbolic link to the labels folder.
    os.symlink(root / "labelsTr", tmp_path / "link")
    with pytest.raises(refused, match="labelsTr"):
        predict_cases(predictor, cases, str(tmp_path / "link"), **quiet)
    assert {p: digest(p) for p in (root / "labelsTr").iterdir()} == labels  # all intact
    assert not (root / "imagesTr" / "preds").exists()

    # An ordinary folder (also one inside the dataset root, or under the scans' folder) is
    # fine, and the flag says "write there anyway".
    written = predict_cases(predictor, cases, str(root / "predictions"), layout="msd",
                            input_dir=str(root), **quiet)
    assert sorted(os.path.basename(p) for p in written) == ["a_000.nii.gz", "a_001.nii.gz"]
    predict_cases(predictor, scans, str(tmp_path / "scans" / "predictions"), **quiet)
    predict_cases(predictor, scans, str(tmp_path / "scans"), overwrite_input_files=True,
                  **quiet)
    assert nib.load(scans[0][1]).get_data_dtype() == np.uint8  # replaced, as asked


def test_predict_case_ids_cannot_leave_the_output_dir(tmp_path):
    from uda_tf.evaluation.predict import predict_cases
    scan = write_scan(tmp_path / "in" / "x.nii.gz")
    out = tmp_path / "deep" / "out"
    for case_id in ("../escaped", "..", "/abs"):
        with pytest.raises(BadNameError, match="case id"):
            predict_cases(slice_predictor(), [(case_id, scan)], str(out), say=lambda *_: None)
    assert not (tmp_path / "deep" / "escaped.nii.gz").exists() and not out.exists()


def test_predict_is_one_writer_per_output_dir(tmp_path):
    from uda_tf.evaluation.predict import predict_cases
    scan = write_scan(tmp_path / "in" / "x.nii.gz")
    out = tmp_path / "out"
    with FlockHolder(out):
        with pytest.raises(OutputLockedError, match="predict --output_dir"):
            predict_cases(slice_predictor(), [("x", scan)], str(out), say=lambda *_: None)
    assert os.listdir(out) == [".uda_tf.lock"]  # the holder's: nothing predicted


def test_prediction_keeps_the_input_qform_and_sform(tmp_path):
    """Scanner qform (code 1) and an aligned sform (code 2) that differ, as after a
    registration: the prediction carries both, codes and matrices, and the units."""
    from uda_tf.evaluation.predict import predict_cases
    image = nib.Nifti1Image((100 * np.random.default_rng(0).random((10, 12, 6)))
                            .astype(np.float32), None)
    qform = np.diag([2.0, 2.0, 3.0, 1.0])
    qform[:3, 3] = [-5.0, 4.0, 1.0]
    sform = np.array([[0.0, -2.0, 0.0, 30.0], [2.0, 0.0, 0.0, -12.0], [0.0, 0.0, 3.0, 7.0],
                      [0.0, 0.0, 0.0, 1.0]])
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    image.header.set_xyzt_units("mm", "msec")
    path = str(tmp_path / "case.nii.gz")
    nib.save(image, path)
    source = nib.load(path).header
    predict_cases(slice_predictor(), [("case", path)], str(tmp_path / "out"),
                  save_probabilities=True, say=lambda *_: None)
    for name in ("case.nii.gz", "case_probabilities.nii.gz"):
        header = nib.load(str(tmp_path / "out" / name)).header
        for getter in ("get_qform", "get_sform"):
            (want, want_code), (got, got_code) = (getattr(h, getter)(coded=True)
                                                  for h in (source, header))
            assert int(got_code) == int(want_code), (name, getter)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{name} {getter}")
        assert header.get_xyzt_units() == ("mm", "msec")


def test_predict_cli_refuses_labels_before_loading_the_model(dataset, tmp_path):
    root, labels = dataset
    # The model does not exist: the output folder is refused before the model is looked at.
    done = run_cli("uda_tf.cli.predict", f"--model={tmp_path}/no_model",
                   f"--input={root}/imagesTr/*_0000.nii.gz", f"--output_dir={root}/labelsTr")
    assert_cli_error(done, "predict", f"--output_dir={root}/labelsTr is", "labelsTr",
                     "--overwrite_input_files")
    assert {p: digest(p) for p in (root / "labelsTr").iterdir()} == labels


# -- SavedModels: signatures and input shapes -------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """SavedModels: uda-export's of a 16x24 and a 16x16 slice model; one saved without
    signatures; one whose only signature is called 'predict'."""
    import tensorflow as tf

    from uda_tf.serving.export import export_segmentor
    root = tmp_path_factory.mktemp("models")
    paths = {"16x24": export_segmentor(conv_model((16, 24, 1)), str(root), "m24",
                                       warmup_batch_sizes=(1,)),
             "16x16": export_segmentor(conv_model((16, 16, 1)), str(root), "m16",
                                       warmup_batch_sizes=(1,))}
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(root / "bare"))
    paths["bare"] = str(root / "bare")

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 24, 1], tf.float32)])
    def predict(image):
        return {"probabilities": tf.concat([1 - image, image], -1)}

    named = tf.Module()
    named.predict = predict
    tf.saved_model.save(named, str(root / "named"), signatures={"predict": predict})
    paths["named"] = str(root / "named")
    return paths


def test_missing_serving_default_is_named_everywhere(models, tiny_prepared):
    from uda_tf.evaluation.evaluate import saved_model_predictor
    from uda_tf.serving.export import load_serving_fn
    from uda_tf.evaluation.predict import load_predictor
    _, manifest = tiny_prepared
    for kind, has in (("bare", "no signatures at all"), ("named", "['predict']")):
        path = models[kind]
        for call in (lambda: load_serving_fn(path),
                     lambda: load_predictor(path, manifest=manifest),
                     lambda: saved_model_predictor(path)):
            with pytest.raises(ValueError) as error:
                call()
            message = str(error.value)
            assert f"--model={path}" in message and "'serving_default'" in message
            assert has in message, message


def test_model_input_that_does_not_fit_the_data_is_named(models, tiny_prepared):
    from uda_tf.evaluation.predict import load_predictor
    _, manifest = tiny_prepared  # 16x24 slices, 1 channel
    # A 2D slice model given 3D records (sliding window over volumes): refused at load.
    volumes = dict(manifest, image_shape=[16, 24, 8, 1],
                   output={**manifest["output"], "records": "volumes"})
    with pytest.raises(ValueError,
                       match=r"--model=.* takes input \[16, 24, 1\].*\[16, 24, 8, 1\].*2D"):
        load_predictor(models["16x24"], manifest=volumes)
    with pytest.raises(ValueError, match=r"1 channel\(s\), the data have 3"):
        load_predictor(models["16x24"], manifest=dict(manifest, image_shape=[16, 24, 3]))
    from uda_tf.evaluation.inference import ModelInputError, check_model_input
    # Patches of a 3D model: any patch size, but channels must match.
    check_model_input([8, 8, 4, 1], [16, 24, 8, 1], model="m", data="d", patches=True)
    with pytest.raises(ModelInputError, match="channel"):
        check_model_input([8, 8, 4, 2], [16, 24, 8, 1], model="m", data="d", patches=True)


@pytest.fixture(scope="module")
def prepared_copy(tiny_prepared, tmp_path_factory):
    """A copy of the tiny prepared dataset (a shard of it gets damaged below)."""
    data_dir, manifest = tiny_prepared
    copy = tmp_path_factory.mktemp("prepared_copy") / "prepared"
    shutil.copytree(data_dir, copy)
    shard = next(s for s in manifest["shards"] if s["domain"] == "dom_b")
    return copy, shard


def test_evaluate_cli_names_a_model_that_does_not_fit(models, prepared_copy, tmp_path):
    copy, shard = prepared_copy
    done = run_cli("uda_tf.cli.evaluate", f"--data_dir={copy}", "--domain=dom_b",
                   f"--split={shard['split']}", f"--model={models['16x16']}",
                   f"--output_dir={tmp_path}/eval", "--nofigures")
    assert_cli_error(done, "evaluate", f"--model={models['16x16']} takes input "
                     "[16, 16, 1]", f"--data_dir={copy}", "[16, 24, 1]")


def test_evaluate_cli_names_a_corrupted_shard(models, prepared_copy, tmp_path):
    copy, shard = prepared_copy
    path = copy / shard["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a record
    path.write_bytes(bytes(data))
    done = run_cli("uda_tf.cli.evaluate", f"--data_dir={copy}", "--domain=dom_b",
                   f"--split={shard['split']}", f"--model={models['16x24']}",
                   f"--output_dir={tmp_path}/eval", "--nofigures")
    assert_cli_error(done, "evaluate", f"shard {path} is corrupted")
    assert not (tmp_path / "eval" / "summary.json").exists()


# -- evaluate: two files for one case ---------------------------------------------------------
def test_evaluate_refuses_two_files_for_one_case(tmp_path):
    from uda_tf.evaluation.evaluate import evaluate_niftis, read_nifti_pairs
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ones, zeros = np.ones((6, 5, 4), np.uint8), np.zeros((6, 5, 4), np.uint8)
    for directory in ("preds", "labels", "preds_ok"):
        (tmp_path / directory).mkdir()
    nib.save(nib.Nifti1Image(ones, affine), str(tmp_path / "preds" / "x.nii.gz"))
    nib.save(nib.Nifti1Image(zeros, affine), str(tmp_path / "preds" / "x_0000.nii.gz"))
    nib.save(nib.Nifti1Image(ones, affine), str(tmp_path / "labels" / "x.nii.gz"))
    with pytest.raises(ValueError, match=r"--predictions=.*x\.nii\.gz and .*x_0000\.nii\.gz "
                       r"are both case 'x'"):
        evaluate_niftis(str(tmp_path / "preds"), str(tmp_path / "labels"),
                        str(tmp_path / "out"), figures=False)
    assert not (tmp_path / "out").exists()
    # The label side: labelsTr/x.nii and x.nii.gz.
    nib.save(nib.Nifti1Image(ones, affine), str(tmp_path / "preds_ok" / "x.nii.gz"))
    nib.save(nib.Nifti1Image(zeros, affine), str(tmp_path / "labels" / "x.nii"))
    with pytest.raises(ValueError, match=r"--labels=.*x\.nii and .*x\.nii\.gz are both case"):
        read_nifti_pairs(str(tmp_path / "preds_ok"), str(tmp_path / "labels"))
