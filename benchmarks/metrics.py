"""Benchmark of volume metrics and whole-volume prediction (a script, not a test).

    .venv/bin/python benchmarks/metrics.py           # about 2-3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/metrics.py --quick   # smaller volumes, for a smoke run

1. Metrics on a 256^3 pair of anatomically shaped masks (smooth irregular blobs, 0.8 x 0.8 x
   1.5 mm voxels), an organ-sized and a brain-sized pair: uda_tf.metrics.binary_metrics (all
   metrics; HD95/ASSD in the medpy and in the DeepMind convention) against the two reference
   packages computing the same numbers (DeepMind `surface-distance`: compute_surface_distances
   + surface Dice + robust Hausdorff + average distance; `medpy`: dc + hd95 + assd), with the
   largest relative difference between ours and theirs.
2. Prediction of one 96 x 112 x 88 volume with the demo-size 2D residual U-Net
   (`residual_unet_2d((96, 112, 1), 4)`) exported as a SavedModel: end to end (read NIfTI,
   preprocess, predict the slices in batches of 32, restore to the file's grid), and the model
   part alone, without and with flip TTA.
3. The 3D Gaussian sliding window on a 96 x 112 x 88 volume (64^3 patches, overlap 0.5) with a
   toy voxelwise predict_fn (the window's own cost), a small Conv3D network, and the
   toolkit's residual 3D U-Net (--model=unet3d, 8 base filters).

Prints a table and writes benchmarks/results/metrics.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "metrics.json")
SPACING = (0.8, 0.8, 1.5)


def blob(shape, centre, radii, seed, roughness=0.25):
    """An ellipsoid whose surface is pushed in and out by smooth noise (organ-like)."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal([max(4, n // 8) for n in shape]), 1.5)
    noise = ndimage.zoom(coarse / np.abs(coarse).max(), [n / c for n, c in
                                                         zip(shape, coarse.shape)], order=1)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return distance + roughness * noise[tuple(slice(0, n) for n in shape)] <= 1.0


def timed(fn, repeat=1):
    best, value = None, None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, value


def bench_metrics(size: int) -> list[dict]:
    import surface_distance as deepmind
    from medpy.metric import binary as medpy

    from uda_tf import metrics
    metrics.surfel_area_table(SPACING)  # the one-off table build is not per pair
    shape, centre = (size,) * 3, np.array([size / 2] * 3)
    pairs = {
        "organ": ((np.array([0.16, 0.12, 0.10]) * size), 1),
        "brain": ((np.array([0.36, 0.42, 0.32]) * size), 2),
    }
    rows = []
    for name, (radii, seed) in pairs.items():
        ref = blob(shape, centre, radii, seed)
        pred = blob(shape, centre + [2, -1.5, 1], radii * 1.03, seed + 10)
        t_medpy_conv, ours = timed(lambda: metrics.binary_metrics(pred, ref, SPACING,
                                                                  cap_mm=None), repeat=2)
        t_dm_conv, ours_dm = timed(lambda: metrics.binary_metrics(
            pred, ref, SPACING, convention="deepmind", cap_mm=None), repeat=2)

        def reference_deepmind():
            d = deepmind.compute_surface_distances(ref, pred, SPACING)
            return {"surface_dice": deepmind.compute_surface_dice_at_tolerance(d, 1.0),
                    "hd95": deepmind.compute_robust_hausdorff(d, 95),
                    "assd": float(np.mean(deepmind.compute_average_surface_distance(d)))}

        def reference_medpy():
            return {"dice": medpy.dc(pred, ref), "hd95": medpy.hd95(pred, ref, SPACING),
                    "assd": medpy.assd(pred, ref, SPACING)}

        t_deepmind, theirs_dm = timed(reference_deepmind)
        t_medpy, theirs_mp = timed(reference_medpy)
        diff = max([abs(ours_dm[k] - v) / max(abs(v), 1e-12) for k, v in theirs_dm.items()]
                   + [abs(ours[k] - v) / max(abs(v), 1e-12) for k, v in theirs_mp.items()])
        rows.append({"pair": f"{name} {size}^3", "voxels_ref": int(ref.sum()),
                     "uda_tf_all_metrics_medpy_convention_s": t_medpy_conv,
                     "uda_tf_all_metrics_deepmind_convention_s": t_dm_conv,
                     "deepmind_surface_distance_s": t_deepmind, "medpy_s": t_medpy,
                     "max_relative_difference": diff,
                     "values": {k: float(v) for k, v in ours.items()
                                if not isinstance(v, bool)}})
    return rows


def make_manifest(directory, size, spacing):
    from uda_tf.data.manifest import write_manifest
    from uda_tf.data.preprocess import PreprocessConfig
    config = PreprocessConfig(spacing=spacing, size=size)
    os.makedirs(directory, exist_ok=True)
    return write_manifest(directory, {
        "dataset_name": "benchmark", "preprocessing": config.to_manifest(),
        "image_shape": [*size, 1], "num_classes": 4,
        "label_names": {"0": "background", "1": "CSF", "2": "GM", "3": "WM"},
        "output": {"records": "slices", "context_slices": 0}})


def bench_predict_2d(tmp: str, depth: int) -> dict:
    import nibabel as nib

    from uda_tf.evaluation import inference
    from uda_tf.serving.export import export_segmentor
    from uda_tf.models.unet import residual_unet_2d
    from uda_tf.evaluation.predict import load_predictor, predict_file, predict_volume
    from uda_tf.data import io
    size = (96, 112)
    manifest = make_manifest(os.path.join(tmp, "prepared"), size, (2.0, 2.0, 2.0))
    model = residual_unet_2d((*size, 1), 4)
    path = export_segmentor(model, os.path.join(tmp, "export"), "bench", manifest=manifest,
                            warmup_batch_sizes=(1,))
    rng = np.random.default_rng(0)
    scan = os.path.join(tmp, "scan_0000.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((*size, depth), dtype=np.float32),
                             np.diag([2.0, 2.0, 2.0, 1.0])), scan)
    out = {"model_parameters": int(model.count_params()), "volume": [*size, depth]}
    for tta in (False, True):
        predictor = load_predictor(path, tta=tta)
        volume = io.read_volume(scan)
        predict_volume(predictor, volume)  # warm-up: graph tracing, oneDNN kernel choice
        suffix = "_tta" if tta else ""
        out[f"end_to_end_s{suffix}"], _ = timed(lambda: predict_file(predictor, scan), 3)
        prepared = np.asarray(volume.array)[..., None]
        out[f"model_only_s{suffix}"], _ = timed(lambda: inference.predict_slices(
            predictor.predict_fn, prepared, batch_size=32), 3)
    return out


def bench_sliding_window(depth: int) -> dict:
    import keras
    import tensorflow as tf

    from uda_tf.evaluation import inference
    volume = np.random.default_rng(0).random((96, 112, depth, 1), dtype=np.float32)
    patch = (64, 64, min(64, depth))

    def voxelwise(batch):
        p = 1.0 / (1.0 + np.exp(-8.0 * (batch - 0.5)))
        return np.concatenate([1.0 - p, p], axis=-1)

    inputs = keras.Input((None, None, None, 1))
    x = inputs
    for filters in (8, 16, 8):
        x = keras.layers.Conv3D(filters, 3, padding="same", activation="relu")(x)
    net = keras.Model(inputs, keras.layers.Conv3D(4, 1)(x))
    conv3d = tf.function(lambda b: tf.nn.softmax(net(b, training=False), -1))
    starts = [len(inference.window_starts(n, p, 0.5)) for n, p in zip(volume.shape, patch)]
    out = {"volume": list(volume.shape[:3]), "patch": list(patch), "overlap": 0.5,
           "patches": int(np.prod(starts))}
    out["toy_voxelwise_s"], _ = timed(lambda: inference.sliding_window(
        voxelwise, volume, patch, overlap=0.5, batch_size=2), 3)
    inference.sliding_window(lambda b: conv3d(b).numpy(), volume, patch, batch_size=2)
    out["conv3d_3_layers_s"], _ = timed(lambda: inference.sliding_window(
        lambda b: conv3d(b).numpy(), volume, patch, overlap=0.5, batch_size=2), 2)
    # The toolkit's own 3D model as --model=unet3d builds it (residual 3D U-Net, 8 base
    # filters, instance norm), on the same volume and windows.
    from uda_tf.models.unet import residual_unet
    unet = residual_unet((*patch, 1), 4, base_filters=8, norm="instance")
    out["unet3d_parameters"] = int(unet.count_params())
    unet3d = tf.function(lambda b: tf.nn.softmax(unet(b, training=False)["logits"], -1))
    inference.sliding_window(lambda b: unet3d(b).numpy(), volume, patch, batch_size=2)
    out["unet3d_s"], _ = timed(lambda: inference.sliding_window(
        lambda b: unet3d(b).numpy(), volume, patch, overlap=0.5, batch_size=2), 2)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128^3 masks, 32 slices")
    args = parser.parse_args()
    size, depth = (128, 32) if args.quick else (256, 88)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.time()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "spacing_mm": SPACING, "metrics": bench_metrics(size)}
    with tempfile.TemporaryDirectory() as tmp:
        result["predict_2d"] = bench_predict_2d(tmp, depth)
    result["sliding_window_3d"] = bench_sliding_window(depth)
    result["seconds"] = time.time() - started

    print(f"\nMetrics per mask pair (spacing {SPACING} mm), seconds")
    print(f"{'pair':<14}{'uda_tf (medpy conv.)':>22}{'uda_tf (deepmind)':>19}"
          f"{'surface-distance':>18}{'medpy':>9}{'max rel. diff':>15}")
    for r in result["metrics"]:
        print(f"{r['pair']:<14}{r['uda_tf_all_metrics_medpy_convention_s']:>22.2f}"
              f"{r['uda_tf_all_metrics_deepmind_convention_s']:>19.2f}"
              f"{r['deepmind_surface_distance_s']:>18.2f}{r['medpy_s']:>9.2f}"
              f"{r['max_relative_difference']:>15.1e}")
    p = result["predict_2d"]
    print(f"\n2D SavedModel ({p['model_parameters']:,} parameters), one {p['volume']} volume:"
          f" end to end {p['end_to_end_s']:.2f} s (TTA {p['end_to_end_s_tta']:.2f} s), "
          f"model only {p['model_only_s']:.2f} s (TTA {p['model_only_s_tta']:.2f} s)")
    s = result["sliding_window_3d"]
    print(f"3D sliding window, {s['volume']} volume, {s['patches']} patches of {s['patch']}: "
          f"toy voxelwise {s['toy_voxelwise_s']:.2f} s, 3-layer Conv3D "
          f"{s['conv3d_3_layers_s']:.2f} s, residual 3D U-Net ({s['unet3d_parameters']:,} "
          f"parameters) {s['unet3d_s']:.2f} s")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".partial", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(RESULTS + ".partial", RESULTS)
    print(f"\nwrote {RESULTS} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
