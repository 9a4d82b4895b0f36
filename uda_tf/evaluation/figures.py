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
        for j, values in enumerate(data, start=1):
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(np.add(j, jitter), values, s=10, alpha=0.7, zorder=3)
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
    colors = ListedColormap([(0, 0, 0, 0)] + [tuple(c) for c in (
        np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.4, 1.0], [1.0, 0.8, 0.0],
                  [0.8, 0.2, 0.9], [0.0, 0.9, 0.9]])[(np.arange(max(num_classes - 1, 1)) % 6)])])
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
    """Training and validation values of a metric share a plot: `dice` and `val_dice` form
    the family `dice`."""
    families: dict[str, list[str]] = {}
    for name in sorted(names):
        family = name[4:] if name.startswith("val_") else name
        families.setdefault(family, []).append(name)
    return families


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
            ax.plot(epochs, values, marker="o", markersize=3,
                    label="validation" if name.startswith("val_") else "training")
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
    spread = images.reshape(len(images), -1).std(axis=1)
    candidates = np.flatnonzero(spread >= 0.5 * spread.max())
    if len(candidates) < count:
        candidates = np.sort(np.argsort(-spread, kind="stable")[:count])
    picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
    return candidates[np.unique(np.round(picks).astype(int))]


def segmentation_grid(images, labels, entropy, path: str, class_names, title: str = "") -> str:
    """Rows = slices; columns = image, predicted labels, entropy (0..1)."""
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    rows = len(images)
    num_classes = len(class_names)
    colors = colormaps["tab10"](np.arange(num_classes) % 10)
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
