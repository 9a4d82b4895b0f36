"""Figures of an evaluation: per-case box plots of the metrics, and one overlay per case.

matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend state);
every PNG is written under a temporary name and renamed.
"""
from __future__ import annotations

import math
import os

import numpy as np

BOX_METRICS = (("dice", "Dice"), ("surface_dice", "surface Dice"), ("assd", "ASSD (mm)"),
               ("hd95", "HD95 (mm)"))


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[: -len(".png")] + ".partial.png"
    try:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
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
