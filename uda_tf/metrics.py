"""Segmentation metrics: a streaming Dice for validation during training, and volume metrics in
millimetres (2D or 3D, any voxel spacing) for evaluation.

Volume metrics, per binary mask pair (`pred`, `ref`), with `spacing` in mm per array axis:

* **Dice** 2|P∩R| / (|P|+|R|); **precision** |P∩R|/|P|, **recall** |P∩R|/|R| and **F-score**
  (F-beta, beta=1 by default, which equals Dice).
* **Surface Dice at tolerance τ** (default 1 mm), the DeepMind definition (Nikolov et al. 2021,
  "Clinically applicable segmentation of head and neck anatomy for radiotherapy", JMIR; package
  `surface-distance`, `compute_surface_distances` + `compute_surface_dice_at_tolerance`): each
  surface is a set of marching-cubes surfels (marching-squares contour segments in 2D) on the
  grid of voxel corners, weighted by its area in mm²; surface Dice is the area of both surfaces
  lying within τ of the other surface over the total area.
* **HD95** and **ASSD**, `convention="medpy"` (default; `medpy.metric.binary.hd95` / `assd`,
  medpy 0.5): the boundary of a mask is its voxels that are not in its erosion with
  connectivity 1 (6-neighbourhood in 3D, 4 in 2D); distances go from every boundary voxel
  centre to the nearest boundary voxel centre of the other mask. HD95 is the 95th percentile
  (linear interpolation) of both directions' distances pooled; ASSD their mean.
  `convention="deepmind"` uses the surfels above instead: HD95 is the larger of the two
  directed surfel-area-weighted 95th percentiles (`compute_robust_hausdorff`), ASSD the mean of
  the two directed area-weighted average distances (`compute_average_surface_distance`).

Empty-mask rules (a class absent from the prediction and/or the reference):

* both empty: Dice, surface Dice, precision, recall and F-score are 1; ASSD and HD95 are not
  defined (NaN) and the result is flagged `both_empty`, so summaries leave them out.
* one empty: Dice, surface Dice, precision, recall and F-score are 0; ASSD and HD95 are the cap
  (`cap_mm`, default 350 mm, the value the crossMoDA challenge evaluation gives a missed
  structure), flagged `one_empty`. Every ASSD/HD95 is capped at `cap_mm` (None: no cap), so an
  empty prediction is never scored better than a far-away one.

Speed: distances come from `scipy.ndimage.distance_transform_edt(sampling=spacing)` on the
bounding box of both masks (plus one voxel), evaluated only at boundary points.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from scipy import ndimage

DEFAULT_TOLERANCE_MM = 1.0
DEFAULT_CAP_MM = 350.0
CONVENTIONS = ("medpy", "deepmind")
METRICS = ("dice", "surface_dice", "assd", "hd95", "precision", "recall", "fscore")


def _streaming_dice_class():
    import keras
    import tensorflow as tf

    class StreamingDice(keras.metrics.Metric):
        """Dice per class accumulated over every pixel seen since the last reset (pooled
        over the validation set, so small slices do not dominate). `result()` returns a
        dict: `dice` (mean over foreground classes) and `dice_<name>` per foreground class."""

        def __init__(self, class_names, name="dice", **kwargs):
            super().__init__(name=name, **kwargs)
            self.class_names = list(class_names)
            n = len(self.class_names)
            for name in ("intersection", "pred_total", "true_total"):
                setattr(self, name, self.add_variable((n,), initializer="zeros", name=name))

        def update_state(self, labels, logits, sample_weight=None):
            """`sample_weight` [batch]: 1 for a real sample, 0 for padding (a final
            validation batch filled up to the global batch size, so that every replica
            gets samples); the padding then counts nowhere."""
            from uda_tf.models.heads import class_probabilities
            n = len(self.class_names)
            # Through the head's probabilities: a sigmoid head has one logit, not n.
            pred = tf.one_hot(tf.argmax(class_probabilities(logits), axis=-1), n,
                              dtype=tf.float32)
            true = tf.one_hot(tf.cast(labels, tf.int32), n, dtype=tf.float32)
            if sample_weight is not None:
                keep = tf.reshape(tf.cast(sample_weight, tf.float32),
                                  [-1] + [1] * (len(pred.shape) - 1))
                pred, true = pred * keep, true * keep
            axes = list(range(len(pred.shape) - 1))
            self.intersection.assign_add(tf.reduce_sum(pred * true, axes))
            self.pred_total.assign_add(tf.reduce_sum(pred, axes))
            self.true_total.assign_add(tf.reduce_sum(true, axes))

        def result(self):
            dice = dice_from_counts(self.intersection, self.pred_total, self.true_total,
                                    ops=tf)
            out = {self.name: tf.reduce_mean(dice[1:])}
            for i, cls in enumerate(self.class_names[1:], start=1):
                out[f"{self.name}_{cls}"] = dice[i]
            return out

        def reset_state(self):
            for v in (self.intersection, self.pred_total, self.true_total):
                v.assign(tf.zeros_like(v))

    StreamingDice.__module__, StreamingDice.__qualname__ = __name__, "StreamingDice"
    return StreamingDice


def __getattr__(name):
    # StreamingDice (training) needs TensorFlow; the volume metrics do not. Defining it on
    # first use keeps `import uda_tf.metrics` light, so NIfTI-only evaluation starts quickly.
    if name == "StreamingDice":
        globals()[name] = _streaming_dice_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dice_from_counts(intersection, pred_size, ref_size, ops=np):
    """Dice 2|P∩R| / (|P|+|R|) from the counts, elementwise (per class), and 1 where a class
    is absent from both prediction and reference: the one place the empty-mask rule for Dice
    is written. `ops` is the array module of the counts (numpy, or tensorflow for the
    streaming metric's variables), so training, selection and evaluation agree."""
    total = pred_size + ref_size
    return ops.where(total > 0, 2.0 * intersection / ops.maximum(total, 1), 1.0)


def volume_dice(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[float, bool]:
    """Dice of class `label` between two label volumes; returns (dice, both_empty)."""
    p, r = pred == label, ref == label
    return dice(p, r), not (p.any() or r.any())


# -- surfels: marching squares / marching cubes on the grid of voxel corners -----------------
# A neighbourhood code says which of the 2^d voxels around a corner point are inside; the
# corner at offset (i, j, k) of the 2x2x2 block carries bit 7 - (4i + 2j + k) (in 2D:
# 3 - (2i + j)), the order of DeepMind's ENCODE_NEIGHBOURHOOD kernels.
#
# The surface inside one block is built by marching cubes (Lorensen & Cline 1987) with its
# vertices at edge midpoints. Where marching cubes leaves a choice, we make the one that
# reproduces DeepMind's published table: a face with two diagonal inside corners is split so
# that the block's surface has the least area, and each polygon is cut into the triangles of
# largest total area (at unit spacing). That leaves one tie: the non-planar hexagon around four
# inside corners that form a chain along three axes, cut into a central triangle and three ears
# either way, with equal area at unit spacing. The table takes the central triangle through the
# vertex with the lexicographically smallest (i, j, k) position except in the configurations
# listed here (it follows no symmetry there; tests/test_metrics.py compares the whole table).
_HEXAGON_OTHER_SPLIT = frozenset({29, 53, 58, 92, 116, 139, 163, 197, 202, 226})


def _code_bit(corner) -> int:
    n = len(corner)
    return (2 ** n - 1) - int("".join(str(c) for c in corner), 2)


def _face_segments(cycle, inside, separate_inside: bool):
    """Contour segments on one square face (corners in cyclic order), as pairs of edges. A
    saddle face (diagonal inside corners) cuts off its inside or its outside corners."""
    edges = [frozenset((cycle[i], cycle[(i + 1) % 4])) for i in range(4)]
    crossing = [e for e in edges if len(e & inside) == 1]
    if len(crossing) == 2:
        return [tuple(crossing)]
    if len(crossing) == 4:
        cut = [i for i in range(4) if (cycle[i] in inside) == separate_inside]
        return [(edges[i - 1], edges[i]) for i in cut]
    return []


def _loops(segments):
    """Closed vertex loops (lists of edges) from segments; every vertex has two segments."""
    neighbours = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        loop, previous = [start], None
        seen.add(start)
        while True:
            following = [v for v in neighbours[loop[-1]] if v != previous and v not in seen]
            if not following:
                break
            previous = loop[-1]
            loop.append(following[0])
            seen.add(following[0])
        loops.append(loop)
    return loops


def _triangle_vectors(points, triangles):
    p, q, r = (points[[t[i] for t in triangles]] for i in range(3))
    return 0.5 * np.cross(q - p, r - p)


def _polygon_triangles(points: np.ndarray, code: int) -> tuple[float, np.ndarray]:
    """(area, area vectors [T, 3]) of the largest-area triangulation of a loop of points,
    by the O(n^3) dynamic programme over the polygon's diagonals."""
    n = len(points)
    combos = list(itertools.combinations(range(n), 3))
    areas = dict(zip(combos, np.linalg.norm(_triangle_vectors(points, combos), axis=1).tolist()))
    best, choice = {}, {}
    for length in range(2, n):
        for i in range(n - length):
            j = i + length
            options = [(round(best.get((i, k), 0.0) + best.get((k, j), 0.0) + areas[(i, k, j)], 9),
                        -k) for k in range(i + 1, j)]
            area, k = max(options)
            best[(i, j)], choice[(i, j)] = area, -k
    triangles, stack = [], [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i >= 2:
            k = choice[(i, j)]
            triangles.append((i, k, j))
            stack += [(i, k), (k, j)]
    planar = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)[-1] < 1e-9
    if n == 6 and not planar:
        # The hexagon tie (see above): a central triangle on every other vertex, plus ears.
        splits = [[(s, s + 2, (s + 4) % 6), (s, s + 1, s + 2), (s + 2, s + 3, s + 4),
                   ((s + 4) % 6, (s + 5) % 6, s)] for s in (0, 1)]
        areas = [round(float(np.linalg.norm(_triangle_vectors(points, t), axis=1).sum()), 9)
                 for t in splits]
        if areas[0] == areas[1] == best[(0, n - 1)]:
            start = min(range(n), key=lambda i: tuple(points[i])) % 2
            triangles = splits[1 - start if code in _HEXAGON_OTHER_SPLIT else start]
    return best[(0, n - 1)], _triangle_vectors(points, triangles)


@functools.lru_cache(maxsize=None)
def _surfel_vectors(ndim: int) -> tuple[np.ndarray, ...]:
    """Per neighbourhood code, the surfels' area vectors at unit spacing: [T, 3] triangle
    normals scaled to their area (3D) or [S, 2] segment vectors (2D)."""
    corners = list(itertools.product((0, 1), repeat=ndim))
    if ndim == 2:
        faces = [[(0, 0), (0, 1), (1, 1), (1, 0)]]
    else:
        faces = []
        for axis, value in itertools.product(range(3), (0, 1)):
            u, v = [a for a in range(3) if a != axis]
            face = []
            for a, b in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[u], corner[v] = value, a, b
                face.append(tuple(corner))
            faces.append(face)
    table = []
    for code in range(2 ** len(corners)):
        inside = frozenset(c for c in corners if code >> _code_bit(c) & 1)
        saddles = [f for f in faces if len(_face_segments(f, inside, True)) == 2]
        best = None
        for choice in itertools.product((True, False), repeat=len(saddles)):
            separate = dict(zip(map(tuple, saddles), choice))
            segments = [s for f in faces
                        for s in _face_segments(f, inside, separate.get(tuple(f), True))]
            if ndim == 2:
                vectors = np.array([np.subtract(*[np.mean(list(e), axis=0) for e in s])
                                    for s in segments]).reshape(-1, 2)
                area = float(np.linalg.norm(vectors, axis=1).sum()) if len(vectors) else 0.0
            else:
                area, parts = 0.0, []
                for loop in _loops(segments):
                    points = np.array([np.mean(list(e), axis=0) for e in loop], float)
                    loop_area, loop_vectors = _polygon_triangles(points, code)
                    area += loop_area
                    parts.append(loop_vectors)
                vectors = np.concatenate(parts) if parts else np.zeros((0, 3))
            if best is None or round(area, 9) < best[0]:
                best = (round(area, 9), vectors)
        table.append(best[1])
    return tuple(table)


@functools.lru_cache(maxsize=64)
def surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Area in mm² (contour length in mm in 2D) of the surfels of each neighbourhood code."""
    spacing = np.asarray(spacing, np.float64)
    if len(spacing) == 3:
        # A triangle's area vector scales by the cofactors of diag(spacing).
        scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2],
                          spacing[0] * spacing[1]])
    else:
        scale = spacing
    return np.array([np.linalg.norm(v * scale, axis=1).sum() if len(v) else 0.0
                     for v in _surfel_vectors(len(spacing))])


# -- boundaries and distances -------------------------------------------------------------
def _check_pair(pred, ref, spacing):
    pred, ref = _as_mask(pred), _as_mask(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got shape {pred.shape}")
    values = np.atleast_1d(np.asarray(spacing, float))
    if values.size == 1:
        values = np.repeat(values, pred.ndim)
    spacing = tuple(float(s) for s in values)
    if len(spacing) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers (mm), got {spacing}")
    return pred, ref, spacing


def _padded_crops(pred, ref):
    """Both masks cut to the bounding box of their union, padded by one empty voxel."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(np.pad(m[tuple(box)], 1) for m in (pred, ref))


def _voxel_boundary(padded):
    """Voxels of the mask with a face neighbour outside it (mask XOR its erosion with
    connectivity 1, as medpy; outside the array counts as outside)."""
    core = (slice(1, -1),) * padded.ndim
    eroded = padded[core].copy()
    for axis in range(padded.ndim):
        for start in (0, 2):
            index = list(core)
            index[axis] = slice(start, start + padded.shape[axis] - 2)
            eroded &= padded[tuple(index)]
    return padded[core] & ~eroded


def _neighbourhood_codes(padded):
    """Code of every corner point of the voxel grid ([n+1] per axis of the unpadded crop)."""
    n = [s - 1 for s in padded.shape]
    codes = np.zeros(n, np.uint8)
    for corner in itertools.product((0, 1), repeat=padded.ndim):
        window = tuple(slice(c, c + m) for c, m in zip(corner, n))
        codes |= padded[window].astype(np.uint8) << _code_bit(corner)
    return codes


def _distances_to(boundary, points, spacing):
    """Distance (mm) from each True point of `points` to the nearest True of `boundary`."""
    return ndimage.distance_transform_edt(~boundary, sampling=spacing)[points]


def _boundary_distances(crops, spacing):
    pred_b, ref_b = (_voxel_boundary(m) for m in crops)
    return _distances_to(ref_b, pred_b, spacing), _distances_to(pred_b, ref_b, spacing)


def _surfel_distances(crops, spacing) -> dict:
    table = surfel_area_table(spacing)
    full = 2 ** (2 ** len(spacing)) - 1
    codes = [_neighbourhood_codes(m) for m in crops]
    borders = [(c != 0) & (c != full) for c in codes]
    out = {}
    for mine, other, (name, other_name) in ((0, 1, ("pred", "ref")), (1, 0, ("ref", "pred"))):
        distances = _distances_to(borders[other], borders[mine], spacing)
        areas = table[codes[mine][borders[mine]]]
        order = np.lexsort((areas, distances))  # DeepMind sorts by (distance, area)
        out[f"distances_{name}_to_{other_name}"] = distances[order]
        out[f"areas_{name}"] = areas[order]
    return out


def _non_empty_crops(pred, ref, spacing, what):
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    if not (pred.any() and ref.any()):
        raise ValueError(f"{what} needs two non-empty masks")
    return _padded_crops(pred, ref), spacing


def boundary_distances(pred, ref, spacing):
    """medpy convention: (pred -> ref, ref -> pred) distances from each boundary voxel centre
    to the nearest boundary voxel centre of the other mask. Both masks must be non-empty."""
    return _boundary_distances(*_non_empty_crops(pred, ref, spacing, "boundary_distances"))


def surfel_distances(pred, ref, spacing) -> dict:
    """DeepMind convention: for each surface, its surfels' distances to the other surface and
    their areas, sorted by (distance, area): keys `distances_ref_to_pred`, `areas_ref`,
    `distances_pred_to_ref`, `areas_pred`. Both masks must be non-empty."""
    return _surfel_distances(*_non_empty_crops(pred, ref, spacing, "surfel_distances"))


def _weighted_percentile(distances, areas, percent):
    """The smallest distance whose cumulative area share reaches `percent` (DeepMind)."""
    share = np.cumsum(areas) / np.sum(areas)
    return float(distances[min(int(np.searchsorted(share, percent / 100.0)), len(distances) - 1)])


# -- metrics ------------------------------------------------------------------------------
def _as_mask(array) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array != 0


def _overlap_scores(tp: int, p: int, r: int, beta: float = 1.0) -> dict:
    """Dice, precision, recall, F-beta from the counts |P∩R|, |P|, |R| (empty-mask rules)."""
    if p == 0 and r == 0:
        return {"dice": 1.0, "precision": 1.0, "recall": 1.0, "fscore": 1.0}
    precision = tp / p if p else 0.0
    recall = tp / r if r else 0.0
    b2 = beta * beta
    denom = b2 * precision + recall
    return {"dice": float(dice_from_counts(tp, p, r)), "precision": precision,
            "recall": recall, "fscore": (1 + b2) * precision * recall / denom if denom else 0.0}


def _counts(pred, ref) -> tuple[int, int, int]:
    return (int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)),
            int(np.count_nonzero(ref)))


def dice(pred, ref) -> float:
    """Dice of two masks; 1 when both are empty, 0 when only one is."""
    return _overlap_scores(*_counts(_as_mask(pred), _as_mask(ref)))["dice"]


def precision_recall_fscore(pred, ref, beta: float = 1.0) -> tuple[float, float, float]:
    """(precision, recall, F-beta); all 1 when both masks are empty, 0 when only one is."""
    scores = _overlap_scores(*_counts(_as_mask(pred), _as_mask(ref)), beta)
    return scores["precision"], scores["recall"], scores["fscore"]


def _check_options(convention, cap_mm):
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if cap_mm is not None and not cap_mm > 0:
        raise ValueError(f"cap_mm must be positive or None, got {cap_mm}")


def _capped(value, cap_mm):
    return value if cap_mm is None else min(value, float(cap_mm))


def binary_metrics(pred, ref, spacing, *, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                   convention: str = "medpy", cap_mm: float | None = DEFAULT_CAP_MM,
                   beta: float = 1.0, only=METRICS) -> dict:
    """The metrics named in `only` (default: all of METRICS) for one mask pair, plus the flags
    `both_empty` and `one_empty` (module docstring: definitions and empty-mask rules).
    `spacing`: mm per array axis (or one number). Distances in mm."""
    pred, ref, spacing = _check_pair(pred, ref, spacing)
    _check_options(convention, cap_mm)
    unknown = sorted(set(only) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    tp, n_pred, n_ref = _counts(pred, ref)
    out = _overlap_scores(tp, n_pred, n_ref, beta)
    out.update(surface_dice=math.nan, assd=math.nan, hd95=math.nan,
               both_empty=n_pred == n_ref == 0, one_empty=(n_pred == 0) != (n_ref == 0))
    wants_distances = bool({"assd", "hd95"} & set(only))
    if out["both_empty"]:
        out["surface_dice"] = 1.0
    elif out["one_empty"]:
        far = math.inf if cap_mm is None else float(cap_mm)
        out.update(surface_dice=0.0, assd=far, hd95=far)
    else:
        crops = _padded_crops(pred, ref)
        if "surface_dice" in only or (wants_distances and convention == "deepmind"):
            s = _surfel_distances(crops, spacing)
            close = (s["areas_ref"][s["distances_ref_to_pred"] <= tolerance_mm].sum()
                     + s["areas_pred"][s["distances_pred_to_ref"] <= tolerance_mm].sum())
            out["surface_dice"] = float(close / (s["areas_ref"].sum() + s["areas_pred"].sum()))
        if wants_distances and convention == "deepmind":
            directed = [(s["distances_ref_to_pred"], s["areas_ref"]),
                        (s["distances_pred_to_ref"], s["areas_pred"])]
            hd95_mm = max(_weighted_percentile(d, a, 95.0) for d, a in directed)
            assd_mm = float(np.mean([np.sum(d * a) / np.sum(a) for d, a in directed]))
        elif wants_distances:
            both = np.concatenate(_boundary_distances(crops, spacing))
            hd95_mm, assd_mm = float(np.percentile(both, 95.0)), float(both.mean())
        if wants_distances:
            out.update(assd=_capped(assd_mm, cap_mm), hd95=_capped(hd95_mm, cap_mm))
    return {k: v for k, v in out.items() if k in only or k in ("both_empty", "one_empty")}


def surface_dice(pred, ref, spacing, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Surface Dice at `tolerance_mm` (DeepMind; 1 when both empty, 0 when one is)."""
    return binary_metrics(pred, ref, spacing, tolerance_mm=tolerance_mm,
                          only=("surface_dice",))["surface_dice"]


def hd95(pred, ref, spacing, *, convention: str = "medpy",
         cap_mm: float | None = DEFAULT_CAP_MM) -> float:
    """95th-percentile Hausdorff distance in mm (NaN when both empty, the cap when one is)."""
    return binary_metrics(pred, ref, spacing, convention=convention, cap_mm=cap_mm,
                          only=("hd95",))["hd95"]


def assd(pred, ref, spacing, *, convention: str = "medpy",
         cap_mm: float | None = DEFAULT_CAP_MM) -> float:
    """Average symmetric surface distance in mm (NaN when both empty, the cap when one is)."""
    return binary_metrics(pred, ref, spacing, convention=convention, cap_mm=cap_mm,
                          only=("assd",))["assd"]


def label_metrics(pred, ref, labels, spacing, **options) -> dict[int, dict]:
    """`binary_metrics` of each label value in `labels` between two label maps."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return {int(k): binary_metrics(pred == k, ref == k, spacing, **options) for k in labels}


# -- image translation against a true paired image --------------------------------------------
def ssim(x: np.ndarray, y: np.ndarray, data_range: float, *, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity of two 2D images [H, W] (or stacks [N, H, W], each slice on
    its own), Wang et al., IEEE TIP 2004: Gaussian-weighted local means, variances and
    covariance (sigma 1.5, truncated at 3.5 sigma: the 11x11 window), constants (k1 L)^2 and
    (k2 L)^2 with L = `data_range`. 1 for identical images."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim not in (2, 3):
        raise ValueError(f"ssim takes two [H, W] or [N, H, W] arrays of one shape, got "
                         f"{x.shape} and {y.shape}")
    if x.ndim == 2:
        x, y = x[None], y[None]
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    blur = functools.partial(ndimage.gaussian_filter, sigma=(0, sigma, sigma), truncate=3.5,
                             mode="reflect")
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def translation_fidelity(translated, reference, labels, label_names: dict) -> dict:
    """How close translated images are to the true images of the same anatomy in the target
    domain (uda_tf.data.paired): `mae` (mean absolute difference), `ssim` (data range: the
    reference's), and per tissue (label > 0) the mean intensity of each, whose mean absolute
    difference is `tissue_contrast_error`: whether the tissues got the target's contrast.
    Arrays [N, H, W(, 1)]; `labels` [N, H, W]."""
    t = np.asarray(translated, np.float64).reshape(np.shape(labels))
    r = np.asarray(reference, np.float64).reshape(np.shape(labels))
    labels = np.asarray(labels)
    tissues = {}
    for value, name in sorted(label_names.items()):
        inside = labels == int(value)
        if int(value) == 0 or not inside.any():
            continue
        tissues[name] = {"translated": float(t[inside].mean()),
                         "reference": float(r[inside].mean())}
    errors = [abs(v["translated"] - v["reference"]) for v in tissues.values()]
    return {"mae": float(np.abs(t - r).mean()),
            "ssim": ssim(t, r, data_range=float(r.max() - r.min()) or 1.0),
            "tissue_contrast_error": float(np.mean(errors)) if errors else float("nan"),
            "tissues": tissues}
