"""Every figure uda_tf draws: an evaluation's per-case box plots and overlays, and a run's
learning curves and sample segmentations with entropy maps.

matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend state);
every PNG is written under a temporary name and renamed.
"""
from __future__ import annotations

import math
import os

import numpy as np

from uda_tf.data.manifest import Manifest
from uda_tf.files import atomic_write

BOX_METRICS = (("dice", "Dice"), ("surface_dice", "surface Dice"), ("assd", "ASSD (mm)"),
               ("hd95", "HD95 (mm)"))
# One colour per foreground class in every figure (class k > 0 gets CLASS_COLORS[(k-1) % n]).
CLASS_COLORS = ((0.90, 0.10, 0.10), (0.10, 0.80, 0.20), (0.20, 0.40, 1.00), (1.00, 0.80, 0.00),
                (0.80, 0.20, 0.90), (0.00, 0.90, 0.90), (1.00, 0.50, 0.00), (0.60, 0.40, 0.20))


def class_colors(num_classes: int) -> np.ndarray:
    """RGBA per class value 0..num_classes-1: background transparent, then CLASS_COLORS."""
    colors = np.zeros((max(num_classes, 2), 4))
    for k in range(1, len(colors)):
        colors[k, :3] = CLASS_COLORS[(k - 1) % len(CLASS_COLORS)]
        colors[k, 3] = 1.0
    return colors


def _save(fig, path: str, dpi: int = 90) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, None) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return path


def box_plot(rows, class_names, path: str) -> str:
    """One panel per metric, one box per class over cases (undefined values left out), each
    case drawn as a point so that a handful of cases is still readable."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3.2 * len(BOX_METRICS), 3.4))
    for i, (key, title) in enumerate(BOX_METRICS):
        ax = fig.add_subplot(1, len(BOX_METRICS), i + 1)
        data = [[r[key] for r in rows if r["class"] == name and not math.isnan(r[key])]
                for name in class_names]
        positions = [j + 1 for j, d in enumerate(data) if d]
        if positions:
            ax.boxplot([d for d in data if d], positions=positions, widths=0.6,
                       showfliers=False)
        colors = class_colors(len(class_names) + 1)
        for j, values in enumerate(data, start=1):
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(np.add(j, jitter), values, s=10, alpha=0.8, zorder=3,
                       color=colors[j, :3])
        ax.set_xticks(range(1, len(class_names) + 1))
        ax.set_xticklabels(class_names, rotation=30, ha="right")
        ax.set_title(title)
        if key in ("dice", "surface_dice"):
            ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"per-case metrics ({len({r['case'] for r in rows})} cases)", y=1.03)
    return _save(fig, path)


def pick_slice(pred: np.ndarray, ref: np.ndarray) -> int:
    """Index along the last axis with the most reference foreground (else prediction, else
    the middle): where there is something to see."""
    for mask in (ref > 0, pred > 0):
        area = mask.reshape(-1, mask.shape[-1]).sum(0)
        if area.max() > 0:
            return int(area.argmax())
    return pred.shape[-1] // 2


def overlay(case: str, item: dict, num_classes: int, path: str) -> str:
    """Image, prediction, label and entropy of one slice of a case side by side (panels
    without data, e.g. no entropy, say so)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    pred, ref = np.asarray(item["pred"]), np.asarray(item["ref"])
    k = pick_slice(pred, ref)
    image = item.get("image")
    image = None if image is None else np.asarray(image)[..., k].T
    colors = ListedColormap(class_colors(num_classes))
    fig = Figure(figsize=(12, 3.4))
    panels = (("image", None), ("prediction", pred), ("label", ref),
              ("entropy", item.get("entropy")))
    for i, (title, data) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.set_axis_off()
        ax.set_title(title)
        if image is not None:
            ax.imshow(image, cmap="gray", origin="lower")
        if title == "entropy":
            if data is None:
                ax.text(0.5, 0.5, "no entropy", ha="center", va="center",
                        transform=ax.transAxes)
            else:
                shown = ax.imshow(np.asarray(data)[..., k].T, cmap="magma", vmin=0, vmax=1,
                                  origin="lower", alpha=0.85 if image is not None else 1.0)
                fig.colorbar(shown, ax=ax, fraction=0.046)
        elif data is not None:
            ax.imshow(np.asarray(data)[..., k].T, cmap=colors, vmin=0,
                      vmax=max(num_classes - 1, 1), origin="lower", alpha=0.6,
                      interpolation="nearest")
        elif image is None:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{case}, slice {k}", y=1.03)
    return _save(fig, path)


def metric_families(names) -> dict[str, list[str]]:
    """Training and validation values of a metric share a plot: `dice`, `val_dice` and
    `oracle/val_dice` form the family `dice`."""
    families: dict[str, list[str]] = {}
    for name in sorted(names):
        family = name.removeprefix("oracle/").removeprefix("val_")
        families.setdefault(family, []).append(name)
    return families


def curve_label(name: str) -> str:
    """What an epoch log is measured on, for a legend."""
    if name.startswith("oracle/"):
        return "target validation (oracle: target labels, not used)"
    if name.startswith("val_"):
        return "source validation"
    if name.startswith("target_"):
        return "target validation (no labels)"
    return "training"


def domain_gap(history: dict, path: str, *, best_epoch: int | None = None,
               monitor: str = "val_dice") -> str | None:
    """The picture of a UDA run: per epoch the source validation Dice, the label-free target
    criteria and (when the target has validation labels) the oracle target Dice, on one
    axis, with the kept epoch marked. None when the history has none of them."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    shown = [n for n in ("val_dice", "target_agreement", "target_teacher_agreement",
                         "target_entropy", "oracle/val_dice") if history.get(n)]
    if not shown:
        return None
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    styles = {"val_dice": dict(color="tab:blue", marker="o"),
              "oracle/val_dice": dict(color="tab:red", marker="s", linestyle="--"),
              "target_entropy": dict(color="tab:purple", marker="v", linestyle=":"),
              "target_agreement": dict(color="tab:green", marker="^", linestyle="-."),
              "target_teacher_agreement": dict(color="tab:olive", marker="^", linestyle="-.")}
    names = {"val_dice": "source validation Dice", "oracle/val_dice":
             "target validation Dice (oracle, not used)", "target_entropy":
             "target mean entropy (lower: more confident)", "target_agreement":
             "target flip agreement (Dice)", "target_teacher_agreement":
             "target teacher-student agreement (Dice)"}
    for name in shown:
        epochs, values = zip(*history[name])
        ax.plot(epochs, values, markersize=4, label=names[name], **styles[name])
    if best_epoch is not None:
        ax.axvline(best_epoch, color="0.3", linewidth=1)
        ax.annotate(f"kept epoch {best_epoch}\n(best {monitor})", (best_epoch, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(4, -4),
                    textcoords="offset points", va="top", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("source vs target during training")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    return _save(fig, path, dpi=100)


def learning_curves(history: dict, out_dir: str) -> list[str]:
    """One PNG per metric family, `<out_dir>/<family>.png`. `history`: {name: [(epoch, value)]}
    as kept by tracking.MlflowEpochLogger."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    paths = []
    for family, names in metric_families(history).items():
        fig = Figure(figsize=(5, 3.2))
        ax = fig.add_subplot()
        for name in names:
            epochs, values = zip(*history[name])
            ax.plot(epochs, values, marker="o", markersize=3, label=curve_label(name))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(family)
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in family)
        paths.append(_save(fig, os.path.join(out_dir, f"{safe}.png"), dpi=100))
    return paths


def pick_slices(images: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` slices spread evenly over those with at least half the largest
    intensity variation (anatomy rather than background; neighbours look alike, so not simply
    the top `count`). Needs no labels."""
    return _spread_over_best(images.reshape(len(images), -1).std(axis=1), count)


def _spread_over_best(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` items spread evenly over those scoring at least half the best
    score (the `count` best when fewer do)."""
    candidates = np.flatnonzero(scores >= 0.5 * scores.max())
    if len(candidates) < count:
        candidates = np.sort(np.argsort(-scores, kind="stable")[:count])
    picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
    return candidates[np.unique(np.round(picks).astype(int))]


def segmentation_grid(images, labels, entropy, path: str, class_names, title: str = "") -> str:
    """Rows = slices; columns = image, predicted labels, entropy (0..1)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    rows = len(images)
    num_classes = len(class_names)
    colors = class_colors(num_classes)
    colors[0] = (0, 0, 0, 1)  # background black
    label_cmap = ListedColormap(colors)
    label_norm = BoundaryNorm(np.arange(num_classes + 1) - 0.5, num_classes)
    fig = Figure(figsize=(7.5, 2.4 * rows + 0.6))
    axes = fig.subplots(rows, 3, squeeze=False)
    for r in range(rows):
        # Transposed: H runs along RAS x, shown left-right, as a radiologist views an axial slice.
        axes[r, 0].imshow(images[r, ..., 0].T, cmap="gray", origin="lower")
        axes[r, 1].imshow(labels[r].T, cmap=label_cmap, norm=label_norm, origin="lower",
                          interpolation="nearest")
        im = axes[r, 2].imshow(entropy[r].T, cmap="magma", vmin=0, vmax=1, origin="lower")
        for c, name in enumerate(("image", "prediction", "entropy")):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name)
    fig.colorbar(im, ax=axes[:, 2], fraction=0.05)
    fig.legend(handles=[Patch(color=colors[i], label=n) for i, n in enumerate(class_names)],
               loc="lower center", ncol=min(num_classes, 6), frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=100)


def image_grid(columns: dict, path: str, *, maps=(), title: str = "") -> str:
    """Rows = slices; one column per entry of `columns` {name: [rows, H, W(, 1)] array}.
    Image columns share one grey scale (the 1st-99th percentile of all of them), so their
    contrasts can be compared; the columns named in `maps` (e.g. an entropy in 0..1) get a
    colour scale of 0..1 each."""
    from matplotlib.figure import Figure
    arrays = {name: np.asarray(a, np.float32).reshape(np.shape(a)[:3])
              for name, a in columns.items()}
    rows = len(next(iter(arrays.values())))
    if any(len(a) != rows for a in arrays.values()):
        raise ValueError(f"image_grid: every column needs {rows} slices, got "
                         f"{ {k: len(a) for k, a in arrays.items()} }")
    greys = [a for name, a in arrays.items() if name not in maps]
    low, high = (np.percentile(np.concatenate([g.ravel() for g in greys]), (1, 99))
                 if greys else (0.0, 1.0))
    fig = Figure(figsize=(2.1 * len(arrays), 2.2 * rows + 0.6))
    axes = fig.subplots(rows, len(arrays), squeeze=False)
    for c, (name, a) in enumerate(arrays.items()):
        for r in range(rows):
            ax = axes[r, c]
            if name in maps:
                im = ax.imshow(a[r].T, cmap="magma", vmin=0, vmax=1, origin="lower")
            else:
                ax.imshow(a[r].T, cmap="gray", vmin=low, vmax=high, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        if name in maps:
            fig.colorbar(im, ax=axes[:, c], fraction=0.05)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def sample_segmentations(serve, data_dir: str, manifest: Manifest, domain: str, path: str, *,
                         count: int = 4, max_slices: int = 512) -> str | None:
    """Grid of `count` slices of `domain` (its val split, else train) predicted by `serve`
    (a SavedModel serving_default). Labels are not read. None when there are no 2D slices."""
    import tensorflow as tf

    from uda_tf.data.pipeline import eval_dataset
    split = next((s for s in ("val", "train") if manifest.num_records(domain, s)), None)
    if split is None or count < 1 or manifest.record_kind != "slices":
        return None  # no slices to show (3D datasets: not drawn yet)
    ds = eval_dataset(data_dir, manifest, domain, split, batch_size=64)
    images = np.concatenate([x.numpy() for x, _ in ds.take(-(-max_slices // 64))])
    images = images[pick_slices(images, count)]
    out = serve(image=tf.constant(images))
    return segmentation_grid(images, out["labels"].numpy(), out["entropy"].numpy(), path,
                             manifest.class_names,
                             title=f"{domain} {split}: prediction and entropy")


def method_comparison(images, reference, predictions: dict, path: str, class_names,
                      title: str = "") -> str:
    """Rows = slices; columns = image, reference labels, then per method its prediction and
    its errors (red where the prediction differs from the reference) on the same slices."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    num_classes = len(class_names)
    cmap = ListedColormap(class_colors(num_classes))
    norm = BoundaryNorm(np.arange(num_classes + 1) - 0.5, num_classes)
    errors = ListedColormap([(0, 0, 0, 0), (1.0, 0.0, 0.0, 1.0)])
    columns = [("image", None), ("reference", None)]
    for method in predictions:
        columns += [(method, "labels"), (f"{method}: errors", "errors")]
    rows = len(images)
    fig = Figure(figsize=(2.1 * len(columns), 2.2 * rows + 0.8))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for r in range(rows):
        image = images[r, ..., 0].T
        for c, (name, kind) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "reference":
                ax.imshow(np.ma.masked_equal(reference[r], 0).T, cmap=cmap, norm=norm,
                          origin="lower", alpha=0.7, interpolation="nearest")
            elif kind == "labels":
                ax.imshow(np.ma.masked_equal(predictions[name][r], 0).T, cmap=cmap, norm=norm,
                          origin="lower", alpha=0.7, interpolation="nearest")
            elif kind == "errors":
                method = name.split(":")[0]
                wrong = (predictions[method][r] != reference[r]).astype(int)
                ax.imshow(wrong.T, cmap=errors, vmin=0, vmax=1, origin="lower",
                          interpolation="nearest")
                ax.set_xlabel(f"{wrong.mean():.1%} of pixels wrong", fontsize=7)
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.legend(handles=[Patch(color=class_colors(num_classes)[i], label=n)
                        for i, n in enumerate(class_names) if i > 0],
               loc="lower center", ncol=min(num_classes, 6), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def compare_methods(serves: dict, data_dir: str, manifest: Manifest, domain: str, path: str,
                    *, split: str = "test", count: int = 4, max_slices: int = 1024) -> str | None:
    """`method_comparison` of the models `serves` {name: serving_default function} on `count`
    slices of `domain`'s labelled `split`, those with the most reference foreground spread
    over the volume. Reads that split's labels: an evaluation picture (target labels here are
    an oracle), never an input of training or model choice. None without labelled 2D
    slices."""
    import tensorflow as tf

    from uda_tf.data.pipeline import eval_dataset
    if manifest.record_kind != "slices" or not manifest.num_records(domain, split):
        return None
    ds = eval_dataset(data_dir, manifest, domain, split, batch_size=64)
    batches = [(x.numpy(), y.numpy()) for x, y in ds.take(-(-max_slices // 64))]
    images = np.concatenate([b[0] for b in batches])
    reference = np.concatenate([b[1] for b in batches])
    reference = reference[..., 0] if reference.ndim == 4 else reference
    picks = _spread_over_best((reference > 0).reshape(len(reference), -1).sum(axis=1), count)
    images, reference = images[picks], reference[picks]
    predictions = {name: serve(image=tf.constant(images))["labels"].numpy()
                   for name, serve in serves.items()}
    return method_comparison(images, reference, predictions, path, manifest.class_names,
                             title=f"{domain} {split} slices (labels shown for evaluation only)")

