"""Figures (uda_tf/evaluation/figures.py): curves labelled by what they are measured on, the
source/target picture with the kept epoch, one colour per class everywhere."""
import numpy as np

from uda_tf.evaluation import figures


def test_curves_are_grouped_and_labelled_by_what_they_measure():
    families = figures.metric_families(["dice", "val_dice", "oracle/val_dice", "seg_loss",
                                        "target_entropy"])
    assert families["dice"] == ["dice", "oracle/val_dice", "val_dice"]
    assert [figures.curve_label(n) for n in families["dice"]] == [
        "training", "target validation (oracle: target labels, not used)", "source validation"]
    assert figures.curve_label("target_entropy") == "target validation (no labels)"


def test_domain_gap_figure(tmp_path):
    assert figures.domain_gap({"seg_loss": [(0, 1.0)]}, str(tmp_path / "none.png")) is None
    history = {"val_dice": [(0, 0.5), (1, 0.7), (2, 0.6)], "target_entropy": [(0, 0.4), (1, 0.3),
               (2, 0.35)], "oracle/val_dice": [(0, 0.2), (1, 0.3), (2, 0.25)]}
    path = figures.domain_gap(history, str(tmp_path / "gap.png"), best_epoch=1)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_colour_per_class():
    colors = figures.class_colors(4)
    assert colors.shape == (4, 4) and colors[0, 3] == 0  # background transparent
    assert np.allclose(colors[1:, :3], figures.CLASS_COLORS[:3])
    # the same class has the same colour whatever the number of classes
    assert np.allclose(figures.class_colors(9)[1:4], colors[1:4])


def test_image_grid(tmp_path):
    import pytest
    images = np.random.default_rng(0).random((2, 8, 8, 1))
    path = figures.image_grid({"a": images, "b": 2 * images, "map": images[..., 0]},
                              str(tmp_path / "g" / "grid.png"), maps=("map",), title="t")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="every column needs 2 slices"):
        figures.image_grid({"a": images, "b": images[:1]}, str(tmp_path / "x.png"))
