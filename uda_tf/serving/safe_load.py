"""The only model files uda_tf loads: `.weights.h5` weights (into a segmentor built from
flags) and SavedModel directories. Never a full-model `.keras`/`.h5` file or a pickle.

A `.keras` or legacy `.h5` model file carries its architecture as config, and a Lambda layer
in it is Python bytecode run at load time; Keras' safe mode refuses those in `load_model`, but
`Model.load_weights` also accepts a `.keras` archive, so the paths that take a user-given file
(`uda-export --checkpoint`, `predict --model`) check the file first: the name must end with
`.weights.h5` and the bytes must start with the HDF5 signature, so a renamed archive is
refused too. SavedModels are read with `tf.saved_model.load` (graphs and variables, no Python).
"""
from __future__ import annotations

import os

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_weights_file(path: str, flag: str) -> str:
    """`path` if it is a weights-only HDF5 file; else ValueError naming the flag."""
    if not path.endswith(".weights.h5"):
        raise ValueError(f"{flag}={path}: only .weights.h5 weights or SavedModel directories "
                         "are loaded; full-model .keras/.h5 files (which may hold Lambda layers "
                         "with code) and pickles are refused")
    with open(path, "rb") as f:
        head = f.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        kind = "a zip archive (a .keras model?)" if head.startswith(b"PK") else "not HDF5"
        raise ValueError(f"{flag}={path} is {kind}, not a .weights.h5 weights file; refused")
    return os.path.abspath(path)
