"""SavedModel serving latency and throughput by batch size (a benchmark, not a test).

    .venv/bin/python benchmarks/serving.py [--batch_sizes=1,4,16,64] [--seconds=8]

Exports the demo-size segmentor (uda_tf.models.unet.residual_unet_2d((96, 112, 1), 4), random
weights: speed does not depend on them) with uda_tf.serving.export.export_segmentor, loads it with
tf.saved_model.load as TF Serving's runtime does, and times one signature call per request
(input already in memory, `labels` copied back to numpy, as a server must). Prints a table and
writes benchmarks/results/serving.json. What it measures is the model's compute on this
machine; TF Serving adds request decoding and its batching queue on top.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
    flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64"], "Slices per request.")
    flags.DEFINE_float("seconds", 8.0, "Timed seconds per batch size (at least --min_requests).",
                       lower_bound=0)
    flags.DEFINE_integer("min_requests", 10, "Timed requests per batch size, at least.",
                         lower_bound=2)
    flags.DEFINE_integer("warmup", 3, "Untimed requests per batch size first.", lower_bound=1)
    flags.DEFINE_integer("base_filters", 16, "U-Net width (16: the demo model).", lower_bound=1)
    flags.DEFINE_enum("signature", "serving_default", ["serving_default", "serving_raw"],
                      "Signature to time (serving_raw also normalises in the graph).")
    flags.DEFINE_string("output", os.path.join(REPO, "benchmarks", "results", "serving.json"),
                        "JSON results file.")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_requests(fn, inputs: dict, *, warmup: int, seconds: float, min_requests: int):
    """Latencies (s) of back-to-back requests."""
    for _ in range(warmup):
        fn(**inputs)["labels"].numpy()
    latencies = []
    start = time.perf_counter()
    while len(latencies) < min_requests or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(**inputs)["labels"].numpy()
        latencies.append(time.perf_counter() - t)
    return latencies


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # the SavedModel writer logs every file at INFO
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        raise app.UsageError(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: integers expected")
    import keras
    import numpy as np
    import tensorflow as tf

    from uda_tf.serving.export import export_segmentor
    from uda_tf.models.unet import residual_unet_2d

    shape, classes = (96, 112, 1), 4
    keras.utils.set_random_seed(0)
    model = residual_unet_2d(shape, classes, base_filters=FLAGS.base_filters)
    manifest = {"image_shape": list(shape), "num_classes": classes,
                "label_names": {str(i): f"class_{i}" for i in range(classes)},
                "preprocessing": {"normalization": "minmax"}}
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = export_segmentor(model, tmp, "bench", manifest=manifest)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        fn = tf.saved_model.load(path).signatures[FLAGS.signature]
        load_s = time.perf_counter() - t
        for batch in batch_sizes:
            inputs = {"image": tf.constant(rng.random((batch, *shape), dtype=np.float32))}
            if FLAGS.signature == "serving_raw":
                inputs.update(p_low=tf.zeros([batch]), p_high=tf.ones([batch]))
            lat = np.asarray(time_requests(fn, inputs, warmup=FLAGS.warmup,
                                           seconds=FLAGS.seconds,
                                           min_requests=FLAGS.min_requests))
            rows.append({"batch_size": batch, "requests": int(lat.size),
                         "p50_ms": float(np.percentile(lat, 50) * 1e3),
                         "p95_ms": float(np.percentile(lat, 95) * 1e3),
                         "mean_ms": float(lat.mean() * 1e3),
                         "slices_per_s": float(batch * lat.size / lat.sum())})

    print(f"SavedModel {FLAGS.signature}: residual_unet_2d{shape}, {classes} classes, "
          f"{model.count_params():,} parameters; {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"export {export_s:.1f} s, load {load_s:.1f} s")
    header = f"{'batch':>6}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}{'ms/slice':>10}" \
             f"{'slices/s':>10}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['batch_size']:>6}{r['requests']:>10}{r['p50_ms']:>10.1f}{r['p95_ms']:>10.1f}"
              f"{r['p50_ms'] / r['batch_size']:>10.2f}{r['slices_per_s']:>10.1f}")
    result = {
        "benchmark": "serving", "signature": FLAGS.signature, "model": {
            "builder": "uda_tf.models.unet.residual_unet_2d", "input_shape": list(shape),
            "num_classes": classes, "base_filters": FLAGS.base_filters,
            "parameters": int(model.count_params())},
        "device": {"kind": "cpu", "cpu": cpu_name(), "cpus": os.cpu_count(),
                   "load_average_1m": os.getloadavg()[0]},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
        "export_seconds": export_s, "load_seconds": load_s, "rows": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    tmp_out = FLAGS.output + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp_out, FLAGS.output)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    # CPU benchmark: hide any GPU so the numbers mean the same on every machine.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    sys.exit(app.run(main))
