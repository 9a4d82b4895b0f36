"""`python -m uda_tf.cli.serve_client` (uda-serve-client): flags and main of the TF Serving
client (REST or gRPC, NIfTI in and out); the library is uda_tf.serving.client.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from uda_tf.cli import entry
from uda_tf.serving.client import PROTOCOLS, ServingClient, predict_slices, segment_nifti


def define_flags():
    from absl import flags
    flags.DEFINE_string("model_name", None, "Model name in TF Serving's models.config.")
    flags.DEFINE_integer("model_version", None, "Model version (default: the server's latest).")
    flags.DEFINE_enum("protocol", "rest", list(PROTOCOLS), "REST (JSON) or gRPC.")
    flags.DEFINE_string("host", "localhost", "TF Serving host.")
    flags.DEFINE_integer("rest_port", 8501, "TF Serving REST port.")
    flags.DEFINE_integer("grpc_port", 8500, "TF Serving gRPC port.")
    flags.DEFINE_float("timeout", 60.0, "Seconds per request.")
    flags.DEFINE_string("nifti", None, "NIfTI volume to segment (writes --output as NIfTI).")
    flags.DEFINE_string("npy", None, "Preprocessed slices [N, H, W, C] float32 .npy to segment "
                        "with serving_default (writes --output as .npy labels).")
    flags.DEFINE_string("manifest", None, "manifest.json of the model's dataset (the SavedModel "
                        "carries one in assets.extra/manifest.json); needed by --nifti.")
    flags.DEFINE_string("output", None, "Where the label map goes.")
    flags.DEFINE_integer("batch_size", 16, "Slices per request.", lower_bound=1)
    flags.DEFINE_bool("raw", False, "--nifti: send raw intensities to serving_raw instead of "
                      "normalising here.")
    flags.DEFINE_bool("row_format", False, "REST: send 'instances' rows instead of 'inputs'.")
    flags.mark_flags_as_required(["model_name", "output"])


def _read_manifest(path: str) -> dict:
    if not path:
        raise SystemExit("--nifti needs --manifest (e.g. <SavedModel>/assets.extra/manifest.json)")
    path = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--manifest={path}: cannot read it: {e}") from e


def main(argv):
    import grpc
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.nifti) == bool(FLAGS.npy):
        raise SystemExit("give exactly one of --nifti and --npy")
    client = ServingClient(FLAGS.model_name, protocol=FLAGS.protocol, host=FLAGS.host,
                           rest_port=FLAGS.rest_port, grpc_port=FLAGS.grpc_port,
                           version=FLAGS.model_version, timeout=FLAGS.timeout,
                           row_format=FLAGS.row_format)
    try:
        if FLAGS.nifti:
            mask = segment_nifti(client, FLAGS.nifti, _read_manifest(FLAGS.manifest),
                                 FLAGS.output, batch_size=FLAGS.batch_size, raw=FLAGS.raw)
            counts = dict(zip(*np.unique(mask, return_counts=True)))
            print(f"wrote {FLAGS.output}: shape {mask.shape}, voxels per label "
                  f"{ {int(k): int(v) for k, v in counts.items()} }")
            return
        if not os.path.isfile(FLAGS.npy):
            raise SystemExit(f"--npy={FLAGS.npy}: no such file")
        images = np.load(FLAGS.npy, allow_pickle=False)  # arrays only, never pickles
        labels = predict_slices(client, images.astype(np.float32),
                                batch_size=FLAGS.batch_size)
    except grpc.RpcError as e:
        raise SystemExit(f"gRPC {FLAGS.host}:{FLAGS.grpc_port} failed: {e.code()} "
                         f"{e.details()}") from e
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise SystemExit(f"client failed: {e}") from e
    np.save(FLAGS.output, labels)
    print(f"wrote {FLAGS.output}: labels {labels.shape}")


# --help's groups (title, first flag); the flags are defined in this order.
HELP_SECTIONS = (("server", "model_name"), ("input and output", "nifti"),
                 ("request", "batch_size"))


ABOUT = """Send a NIfTI scan (or a .npy array) to a TF Serving model over REST or gRPC and
write the returned segmentation.

example: python -m uda_tf.cli.serve_client --model_name=uda_demo --nifti=scan.nii.gz \\
           --output=segmentation.nii.gz"""


def run():
    entry.run(main, define_flags, ABOUT, sections=HELP_SECTIONS)


if __name__ == "__main__":
    sys.exit(run())
