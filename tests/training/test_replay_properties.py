"""The mlflow_unsent.json format (training/tracking.py): whatever bytes or JSON end up in the
file, reading it gives the queue or UnsentFileError naming the file, never another exception;
a queue written by RunTracker.finish reads back unchanged."""
import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uda_tf.training import tracking

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
text = st.text(string.printable, max_size=12)
metric = st.fixed_dictionaries({"key": text, "value": st.floats(allow_nan=False) | st.integers(),
                                "timestamp": st.integers(0, 2**41), "step": st.integers(0, 99)})
artifact = st.fixed_dictionaries({"path": text, "artifact_path": st.none() | text})
model = st.none() | st.fixed_dictionaries(
    {"saved_model": text, "register_name": text, "alias": text, "name": text,
     "step": st.integers(0, 99), "input_example": st.booleans()})
dataset_input = st.fixed_dictionaries({k: text for k in ("name", "digest", "source", "context")})
queue = st.fixed_dictionaries({
    "tracking_uri": text, "experiment": text, "run_name": st.none() | text,
    "run_id": st.none() | text, "status": st.sampled_from(["FINISHED", "FAILED"]),
    "last_error": st.none() | text,
    "pending": st.fixed_dictionaries({
        "params": st.dictionaries(text, text, max_size=3),
        "tags": st.dictionaries(text, text, max_size=3),
        "metrics": st.lists(metric, max_size=3), "artifacts": st.lists(artifact, max_size=2),
        "inputs": st.lists(dataset_input, max_size=2), "model": model})})


def _read(path):
    try:
        saved = tracking.read_unsent(str(path))
    except tracking.UnsentFileError as e:
        assert str(path) in str(e)
        return None
    assert isinstance(saved["pending"]["metrics"], list)
    return saved


@SETTINGS
@given(data=st.binary(max_size=200))
def test_any_bytes_give_the_queue_or_the_named_error(tmp_path, data):
    path = tmp_path / tracking.UNSENT_FILE
    path.write_bytes(data)
    _read(path)


@SETTINGS
@given(value=json_values)
def test_any_json_gives_the_queue_or_the_named_error(tmp_path, value):
    path = tmp_path / tracking.UNSENT_FILE
    path.write_text(json.dumps(value))
    _read(path)


@SETTINGS
@given(saved=queue, cut=st.floats(0, 1, exclude_max=True))
def test_written_queues_read_back_and_truncated_ones_are_named(tmp_path, saved, cut):
    path = tmp_path / tracking.UNSENT_FILE
    tracking._write_atomic(str(path), json.dumps(saved, indent=1))
    assert tracking.read_unsent(str(path)) == saved
    whole = path.read_bytes()
    path.write_bytes(whole[:int(len(whole) * cut)])
    _read(path)  # a cut that still parses must still be a well-formed queue


def test_deeply_nested_or_huge_numbers_are_named(tmp_path):
    path = tmp_path / tracking.UNSENT_FILE
    for body in ["[" * 100000 + "]" * 100000, '{"tracking_uri": ' + "9" * 5000 + "}"]:
        path.write_text(body)
        assert _read(path) is None
