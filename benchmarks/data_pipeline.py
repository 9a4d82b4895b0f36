"""Data-layer benchmark: preparation speed, tf.data throughput (2D slices, 3D patches) with the
augmentation and the source/target zip, per-op augmentation costs, and peak memory, at two
dataset sizes.

    .venv/bin/python benchmarks/data_pipeline.py            # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/data_pipeline.py --quick    # smaller, for a smoke run

Prints a table and writes benchmarks/results/data_pipeline.json. Every measurement runs in a
fresh subprocess so its peak RSS (ru_maxrss) is its own. Streams also report CPU milliseconds
per sample (process CPU time over the measured batches): on a shared machine the rate says
what the pipeline got, the CPU time what it costs. Slices/s of a source/target zip count both
domains' slices. The 2D zip runs with the `full`, `randomized` (full + label_intensity) and
`full_gin` (full + gin) presets. Synthetic NIfTI volumes (smooth blobs
and their labels, 256 x 256 in-plane at 1 mm) in the MSD layout, two domains.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "data_pipeline.json")
BATCH_2D, BATCH_3D = 32, 2


def make_dataset(root: str, volumes_per_domain: int, shape, seed: int = 0) -> None:
    """Two domains of blob volumes in the MSD layout (domain b: other contrast and a bias)."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    os.makedirs(os.path.join(root, "imagesTr"))
    os.makedirs(os.path.join(root, "labelsTr"))
    rng = np.random.default_rng(seed)
    domains = {}
    for d in ("a", "b"):
        for i in range(volumes_per_domain):
            case = f"{d}_{i:03d}"
            noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 6)
            label = np.digitize(noise, np.quantile(noise, [0.7, 0.9])).astype(np.uint8)
            image = 100 + 40 * label + 5 * rng.standard_normal(shape).astype(np.float32)
            if d == "b":
                image = 300 - 0.5 * image + np.linspace(0, 30, shape[0])[:, None, None]
            affine = np.diag([1.0, 1.0, 2.0, 1.0])
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine),
                     os.path.join(root, "imagesTr", f"{case}_0000.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine),
                     os.path.join(root, "labelsTr", f"{case}.nii.gz"))
            domains.setdefault(f"site_{d}", []).append(case)
    meta = {"name": "bench", "channel_names": {"0": "MR"},
            "labels": {"background": 0, "soft": 1, "core": 2},
            "numTraining": 2 * volumes_per_domain,
            "file_ending": ".nii.gz", "domains": domains}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)


def _child(kind: str, args: dict) -> dict:
    """Runs one measurement in a subprocess; returns its JSON result plus peak RSS."""
    code = ("import json, sys; sys.path.insert(0, %r); from benchmarks import data_pipeline as b;"
            "print('RESULT ' + json.dumps(b.measure_%s(json.loads(sys.argv[1]))))" % (ROOT, kind))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def measure_prepare(a: dict) -> dict:
    from uda_tf.data.prepare import prepare

    start = time.perf_counter()
    manifest = prepare(a["raw"], a["out"], spacing=(1, 1, 2), size=a["size"], workers=2,
                       verbose=False, output=a["output"], image_dtype=a["dtype"],
                       records_per_shard=a["records_per_shard"], split=(0.7, 0.2, 0.1))
    seconds = time.perf_counter() - start
    return {"volumes": len(manifest["cases"]), "seconds": seconds,
            "volumes_per_s": len(manifest["cases"]) / seconds,
            "records": sum(s["records"] for s in manifest["shards"]),
            "peak_rss_mb": _peak_rss_mb(),
            # the largest spawned preprocessing worker (ru_maxrss of children is their max)
            "peak_rss_worker_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN)}


def _drain(ds, batches: int, warmup: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for `batches` batches after `warmup`."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start, time.process_time() - cpu


def measure_stream(a: dict) -> dict:
    """Throughput of one training stream configuration, in samples delivered per second."""
    import tensorflow as tf

    from uda_tf.data import manifest as manifest_lib, pipeline, tfrecord

    tf.random.set_seed(0)
    manifest = manifest_lib.load_manifest(a["data"])
    if a["mode"] == "bare":
        # The reference reader: interleaved shards, per-record parse + decode_raw, flip, batch.
        h, w, c = manifest["image_shape"]
        files = manifest.shard_files(a["data"], "site_a", "train")
        ds = pipeline._records(files, shuffle_files=True, seed=0,
                               compression=manifest.compression).repeat()
        ds = ds.map(lambda r: tfrecord.parse_slice(r, h, w, c, image_dtype=manifest["image_dtype"]),
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda e: (tf.image.random_flip_left_right(e["image"]), e["label"]),
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(BATCH_2D).prefetch(tf.data.AUTOTUNE)
        per_batch = BATCH_2D
    else:
        kwargs = dict(global_batch_size=a["batch"], shuffle_buffer=a["shuffle_buffer"],
                      augment_data=a["augment"] != "none", augmentations=a["augment"],
                      patch_size=a.get("patch_size"))
        if a["mode"] == "zip":
            ds = pipeline.train_dataset(a["data"], manifest, source="site_a", target="site_b",
                                        **kwargs)
            per_batch = 2 * a["batch"]  # source + target samples per step
        else:
            ds = pipeline.train_dataset(a["data"], manifest, source="site_a", **kwargs)
            per_batch = a["batch"]
    seconds, cpu_seconds = _drain(ds, a["batches"], a["warmup"])
    # CPU time per sample depends much less on other processes than the wall-clock rate:
    # on a shared machine it tells what the pipeline costs, the rate what it got.
    return {"samples_per_s": a["batches"] * per_batch / seconds,
            "steps_per_s": a["batches"] / seconds,
            "cpu_ms_per_sample": 1000 * cpu_seconds / (a["batches"] * per_batch),
            "peak_rss_mb": _peak_rss_mb()}


def measure_ops(a: dict) -> dict:
    """ms per batch of 32 slices 256x256 of each augmentation op alone at its default
    probability, of the fused spatial step, and of the full and default sets."""
    import tensorflow as tf

    from uda_tf.data import augment

    tf.random.set_seed(0)
    x = tf.random.uniform([BATCH_2D, 256, 256, 1])
    y = tf.cast(tf.random.uniform([BATCH_2D, 256, 256], 0, 3, tf.int32), tf.uint8)
    sets = {name: [name] for name in augment.OPS}
    sets.update({"rotation+scaling+elastic": ["rotation", "scaling", "elastic"],
                 "preset default": "default", "preset full": "full",
                 "preset randomized": "randomized", "preset full_gin": "full_gin"})
    out = {}
    for label, names in sets.items():
        fn = tf.function(augment.build(names))
        for _ in range(3):  # the first call compiles
            fn(x, y)[0].numpy()
        start = time.perf_counter()
        for _ in range(a["repeats"]):
            r = fn(x, y)
        r[0].numpy()
        out[label] = 1000 * (time.perf_counter() - start) / a["repeats"]
    return out


def run(quick: bool) -> dict:
    sizes = {"small": 4, "large": 12} if quick else {"small": 8, "large": 32}
    depth = 8 if quick else 24
    batches = 15 if quick else 60
    results = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
               "batch_2d": BATCH_2D, "batch_3d": BATCH_3D, "sizes": {}, "ops_ms_per_batch": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in sizes.items():
            raw = os.path.join(tmp, f"raw_{name}")
            make_dataset(raw, n, (256, 256, depth))
            entry = {"volumes_per_domain": n}
            out2d = os.path.join(tmp, f"p2d_{name}")
            entry["prepare_2d"] = _child("prepare", dict(raw=raw, out=out2d, size=[256, 256],
                                                         output="slices", dtype="float32",
                                                         records_per_shard=32))
            out2d16 = os.path.join(tmp, f"p2d16_{name}")
            entry["prepare_2d_f16"] = _child("prepare", dict(
                raw=raw, out=out2d16, size=[256, 256], output="slices", dtype="float16",
                records_per_shard=32))
            out3d = os.path.join(tmp, f"p3d_{name}")
            entry["prepare_3d"] = _child("prepare", dict(raw=raw, out=out3d, size=[128, 128, 48],
                                                         output="volumes", dtype="float16",
                                                         records_per_shard=1))
            # Shuffle buffer and interleave width (4 shards of 32 slices) are smaller than the
            # smaller dataset's train split, so both sizes hold the same buffers: memory bounded
            # by them, not by the data.
            common = dict(data=out2d, batch=BATCH_2D, shuffle_buffer=128, batches=batches,
                          warmup=5)
            entry["bare_reader_2d"] = _child("stream", dict(common, mode="bare", augment="none"))
            entry["source_2d_no_aug"] = _child("stream", dict(common, mode="source",
                                                              augment="none"))
            entry["source_2d_default"] = _child("stream", dict(common, mode="source",
                                                               augment="default"))
            entry["zip_2d_full"] = _child("stream", dict(common, mode="zip", augment="full"))
            # Domain randomisation on top of full: label_intensity (labelled source batches
            # only; the target's are unlabelled) and the random-network GIN (both domains).
            for preset in ("randomized", "full_gin"):
                entry[f"zip_2d_{preset}"] = _child("stream", dict(common, mode="zip",
                                                                  augment=preset))
            # The same images stored as float16 (--image_dtype=float16): half the bytes to read
            # and parse.
            entry["zip_2d_full_f16"] = _child("stream", dict(common, data=out2d16, mode="zip",
                                                             augment="full"))
            entry["zip_3d_full"] = _child("stream", dict(
                data=out3d, batch=BATCH_3D, shuffle_buffer=4, batches=max(10, batches // 2),
                warmup=3, mode="zip", augment="full", patch_size=[64, 64, 32]))
            results["sizes"][name] = entry
            print(f"done: {name}", file=sys.stderr, flush=True)
    results["ops_ms_per_batch"] = _child("ops", {"repeats": 5 if quick else 15})
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    return results


def print_table(r: dict) -> None:
    print(f"\nCPU cores: {r['machine']['cpus']}, load average at start/end: "
          f"{r['machine']['load_avg_1m']:.1f}/{r['machine']['load_avg_1m_end']:.1f} "
          "(shared machine)")
    rows = [("prepare 2D (volumes/s)", "prepare_2d", "volumes_per_s"),
            ("prepare 2D float16 (volumes/s)", "prepare_2d_f16", "volumes_per_s"),
            ("prepare 3D (volumes/s)", "prepare_3d", "volumes_per_s"),
            ("bare parse+flip reader (slices/s)", "bare_reader_2d", "samples_per_s"),
            ("source only, no aug (slices/s)", "source_2d_no_aug", "samples_per_s"),
            ("source only, default aug (slices/s)", "source_2d_default", "samples_per_s"),
            ("source+target zip, full aug (slices/s)", "zip_2d_full", "samples_per_s"),
            ("source+target zip, full aug (steps/s)", "zip_2d_full", "steps_per_s"),
            ("  CPU ms per slice", "zip_2d_full", "cpu_ms_per_sample"),
            ("source+target zip, randomized (slices/s)", "zip_2d_randomized", "samples_per_s"),
            ("  CPU ms per slice", "zip_2d_randomized", "cpu_ms_per_sample"),
            ("source+target zip, full_gin (slices/s)", "zip_2d_full_gin", "samples_per_s"),
            ("  CPU ms per slice", "zip_2d_full_gin", "cpu_ms_per_sample"),
            ("same, float16 records (slices/s)", "zip_2d_full_f16", "samples_per_s"),
            ("  CPU ms per slice", "zip_2d_full_f16", "cpu_ms_per_sample"),
            ("3D zip, full aug, 64x64x32 (patches/s)", "zip_3d_full", "samples_per_s"),
            ("  CPU ms per patch", "zip_3d_full", "cpu_ms_per_sample")]
    names = list(r["sizes"])
    header = f"{'measure':44s}" + "".join(
        f"{n + ' (' + str(r['sizes'][n]['volumes_per_domain']) + '/dom)':>18s}" for n in names)
    print(header + "\n" + "-" * len(header))
    for label, key, field in rows:
        print(f"{label:44s}" + "".join(f"{r['sizes'][n][key][field]:18.2f}" for n in names))
    print("peak RSS, MB")
    for key in ("prepare_2d", "prepare_2d_f16", "prepare_3d", "bare_reader_2d",
                "source_2d_default", "zip_2d_full", "zip_2d_randomized", "zip_2d_full_gin",
                "zip_2d_full_f16", "zip_3d_full"):
        print(f"  {key:42s}" + "".join(f"{r['sizes'][n][key]['peak_rss_mb']:18.0f}" for n in names))
    for key in ("prepare_2d", "prepare_3d"):
        print(f"  {key + ' (largest worker)':42s}" + "".join(
            f"{r['sizes'][n][key]['peak_rss_worker_mb']:18.0f}" for n in names))
    print(f"\naugmentation cost, ms per batch of {r['batch_2d']} slices 256x256 "
          "(each op alone at its default probability)")
    for name, ms in r["ops_ms_per_batch"].items():
        print(f"  {name:30s} {ms:8.1f} ms  ({r['batch_2d'] / ms * 1000:8.0f} slices/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller datasets and runs")
    args = parser.parse_args()
    results = run(args.quick)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)
    print_table(results)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
