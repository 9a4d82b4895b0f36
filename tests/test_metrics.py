"""Volume metrics against the reference implementations (DeepMind `surface-distance`, `medpy`)
on random and anatomically shaped masks, 2D and 3D, anisotropic spacing; empty-mask rules."""
import math

import numpy as np
import pytest
import surface_distance as deepmind
from medpy.metric import binary as medpy
from scipy import ndimage
from surface_distance import lookup_tables

from uda_tf import metrics

RTOL = 1e-6


def ellipsoid(shape, centre, radii):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def blob(shape, rng, sigma=3.0, level=0.6):
    """A smooth irregular shape: thresholded smoothed noise inside an ellipsoid."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    centre = np.array(shape) / 2
    return (noise > 1 - level) & ellipsoid(shape, centre, np.array(shape) * 0.42)


def pairs():
    """(name, pred, ref, spacing): random, ellipsoids, blobs, touching the array border."""
    rng = np.random.default_rng(7)
    out = []
    for ndim, shape in ((3, (40, 36, 32)), (2, (64, 56))):
        spacing = (0.7, 1.3, 2.9)[:ndim] if ndim == 3 else (0.45, 1.7)
        centre = np.array(shape) / 2
        out.append((f"random{ndim}d", rng.random(shape) < 0.3, rng.random(shape) < 0.35,
                    spacing))
        out.append((f"ellipsoid{ndim}d", ellipsoid(shape, centre + 1.5, np.array(shape) * 0.3),
                    ellipsoid(shape, centre, np.array(shape) * 0.27), spacing))
        out.append((f"blob{ndim}d", blob(shape, rng), blob(shape, rng), spacing))
        edge_pred, edge_ref = rng.random(shape) < 0.5, ellipsoid(shape, centre * 0, shape)
        out.append((f"border{ndim}d", edge_pred, edge_ref, spacing))
    return out


PAIRS = pairs()


@pytest.mark.parametrize("name,pred,ref,spacing", PAIRS, ids=[p[0] for p in PAIRS])
def test_agrees_with_reference_packages(name, pred, ref, spacing):
    ours = metrics.binary_metrics(pred, ref, spacing, cap_mm=None)
    ours_dm = metrics.binary_metrics(pred, ref, spacing, convention="deepmind", cap_mm=None)
    distances = deepmind.compute_surface_distances(ref, pred, spacing)  # (gt, pred) order
    expected = {
        "dice": medpy.dc(pred, ref),
        "precision": medpy.precision(pred, ref),
        "recall": medpy.recall(pred, ref),
        "hd95": medpy.hd95(pred, ref, voxelspacing=spacing),
        "assd": medpy.assd(pred, ref, voxelspacing=spacing),
    }
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=RTOL), key
    assert ours["dice"] == pytest.approx(deepmind.compute_dice_coefficient(ref, pred), rel=RTOL)
    assert ours["fscore"] == pytest.approx(ours["dice"], rel=RTOL)  # F1 is Dice
    for tolerance in (0.0, 1.0, 2.5):
        got = metrics.surface_dice(pred, ref, spacing, tolerance_mm=tolerance)
        want = deepmind.compute_surface_dice_at_tolerance(distances, tolerance)
        assert got == pytest.approx(want, rel=RTOL), tolerance
    assert ours_dm["surface_dice"] == pytest.approx(
        deepmind.compute_surface_dice_at_tolerance(distances, 1.0), rel=RTOL)
    assert ours_dm["hd95"] == pytest.approx(
        deepmind.compute_robust_hausdorff(distances, 95), rel=RTOL)
    assert ours_dm["assd"] == pytest.approx(
        np.mean(deepmind.compute_average_surface_distance(distances)), rel=RTOL)
    assert not ours["both_empty"] and not ours["one_empty"]


def test_surfel_area_tables_match_deepmind():
    rng = np.random.default_rng(0)
    for spacing in [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9)] + [tuple(rng.uniform(0.2, 5, 3))
                                                        for _ in range(5)]:
        np.testing.assert_allclose(
            metrics.surfel_area_table(spacing),
            lookup_tables.create_table_neighbour_code_to_surface_area(spacing), rtol=1e-12)
    for spacing in [(1.0, 1.0), (0.45, 1.7)]:
        np.testing.assert_allclose(
            metrics.surfel_area_table(spacing),
            lookup_tables.create_table_neighbour_code_to_contour_length(spacing), rtol=1e-12)


def test_directed_surfel_distances_match_deepmind():
    name, pred, ref, spacing = PAIRS[2]  # 3D blobs
    ours = metrics.surfel_distances(pred, ref, spacing)
    theirs = deepmind.compute_surface_distances(ref, pred, spacing)
    np.testing.assert_allclose(ours["distances_ref_to_pred"], theirs["distances_gt_to_pred"])
    np.testing.assert_allclose(ours["areas_ref"], theirs["surfel_areas_gt"])
    np.testing.assert_allclose(ours["distances_pred_to_ref"], theirs["distances_pred_to_gt"])
    np.testing.assert_allclose(ours["areas_pred"], theirs["surfel_areas_pred"])


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_mask_rules(ndim):
    shape, spacing = (12,) * ndim, (1.0, 2.0, 3.0)[:ndim]
    empty, some = np.zeros(shape, bool), np.zeros(shape, bool)
    some[(slice(3, 7),) * ndim] = True
    both = metrics.binary_metrics(empty, empty, spacing)
    assert both["both_empty"] and not both["one_empty"]
    assert [both[k] for k in ("dice", "surface_dice", "precision", "recall", "fscore")] == [1.0] * 5
    assert math.isnan(both["assd"]) and math.isnan(both["hd95"])
    for pred, ref in ((empty, some), (some, empty)):
        one = metrics.binary_metrics(pred, ref, spacing)
        assert one["one_empty"] and not one["both_empty"]
        assert [one[k] for k in ("dice", "surface_dice", "precision", "recall", "fscore")] == \
            [0.0] * 5
        assert one["assd"] == one["hd95"] == metrics.DEFAULT_CAP_MM == 350.0
        assert metrics.binary_metrics(pred, ref, spacing, cap_mm=100.0)["hd95"] == 100.0
        assert metrics.hd95(pred, ref, spacing, cap_mm=None) == math.inf
    far = np.zeros((4, 4, 400), bool)
    near = far.copy()
    far[1, 1, 399], near[1, 1, 0] = True, True  # 399 mm apart: capped at 350
    assert metrics.assd(far, near, 1.0) == 350.0
    assert metrics.assd(far, near, 1.0, cap_mm=None) == pytest.approx(399.0)


def test_label_metrics_per_class_and_volume_dice():
    ref = np.zeros((10, 10, 6), np.uint8)
    ref[2:6, 2:6, 1:4], ref[6:9, 6:9, 2:5] = 1, 2
    pred = ref.copy()
    pred[2:6, 2:6, 1] = 0
    per_class = metrics.label_metrics(pred, ref, [1, 2, 3], (1.0, 1.0, 2.0))
    assert per_class[2]["dice"] == 1.0 and per_class[2]["hd95"] == 0.0
    assert per_class[1]["dice"] == pytest.approx(2 * 32 / (32 + 48))
    assert per_class[3]["both_empty"]
    assert metrics.volume_dice(pred, ref, 1) == (pytest.approx(2 * 32 / 80), False)


def test_dice_from_counts_is_the_one_rule_for_numpy_and_tensorflow():
    """Streaming (TF), selection and volume Dice all use dice_from_counts: same numbers, and
    a class absent from both sides scores 1, absent from one side 0."""
    import tensorflow as tf
    counts = ([3.0, 0.0, 0.0], [4.0, 0.0, 5.0], [6.0, 0.0, 0.0])
    expected = [0.6, 1.0, 0.0]
    assert metrics.dice_from_counts(*map(np.array, counts)).tolist() == pytest.approx(expected)
    as_tf = metrics.dice_from_counts(*(tf.constant(c) for c in counts), ops=tf)
    assert as_tf.numpy().tolist() == pytest.approx(expected)
    assert float(metrics.dice_from_counts(0, 0, 0)) == 1.0


def test_errors_name_the_problem():
    mask = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="spacing"):
        metrics.binary_metrics(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="convention"):
        metrics.binary_metrics(mask, mask, 1.0, convention="itk")
    with pytest.raises(ValueError, match="shape"):
        metrics.binary_metrics(mask, mask[:2], 1.0)
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.binary_metrics(mask, mask, 1.0, only=("jaccard",))


def test_ssim_and_translation_fidelity():
    from uda_tf.metrics import ssim, translation_fidelity
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((2, 32, 32)), 2)
    x = (x - x.min()) / (x.max() - x.min())
    assert ssim(x, x, data_range=1.0) == pytest.approx(1.0)
    noisy = x + rng.normal(0, 0.05, x.shape)
    s = ssim(x, noisy, data_range=1.0)
    assert 0 < s < 0.99 and s == pytest.approx(ssim(noisy, x, data_range=1.0))
    assert ssim(x, 1 - x, data_range=1.0) < 0  # inverted structure: negative correlation
    # one 2D image alone is the same as a stack of one
    assert ssim(x[0], noisy[0], 1.0) == pytest.approx(ssim(x[:1], noisy[:1], 1.0))
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, :2] = 1
    labels[0, 2:, :2] = 2
    ref = np.where(labels == 1, 0.9, np.where(labels == 2, 0.3, 0.0))
    out = translation_fidelity(ref + 0.1 * (labels == 1), ref, labels,
                               {0: "background", 1: "a", 2: "b", 3: "absent"})
    assert out["mae"] == pytest.approx(0.1 * 8 / 16)
    assert out["tissues"] == {"a": {"translated": pytest.approx(1.0), "reference": 0.9},
                              "b": {"translated": 0.3, "reference": 0.3}}
    assert out["tissue_contrast_error"] == pytest.approx(0.05)
