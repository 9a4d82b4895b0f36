"""Volume evaluation: Dice per case and class, the empty-mask rules, the summary format."""
import json

import numpy as np
import pytest

from uda_tf.evaluate import score_volumes, summarise, write_results
from uda_tf.metrics import volume_dice

NAMES = {0: "background", 1: "a", 2: "b"}


def test_volume_dice_and_empty_mask_rules():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1
    pred = np.zeros_like(ref)
    pred[:1] = 1
    assert volume_dice(pred, ref, 1) == pytest.approx((2 * 16 / (16 + 32), False))
    assert volume_dice(pred, ref, 2) == (1.0, True)      # absent from both: 1, flagged
    assert volume_dice(np.zeros_like(ref), ref, 1) == (0.0, False)  # absent from one: 0
    assert volume_dice(ref, np.zeros_like(ref), 1) == (0.0, False)


def test_summary_and_files(tmp_path):
    ref = np.zeros((4, 4, 2), np.uint8)
    ref[:2], ref[2:] = 1, 2
    perfect, swapped = ref.copy(), np.where(ref == 1, 2, 1).astype(np.uint8)
    rows = score_volumes({"c1": (perfect, ref), "c2": (swapped, ref)}, NAMES)
    assert [(r["case"], r["class"], r["dice"]) for r in rows] == [
        ("c1", "a", 1.0), ("c1", "b", 1.0), ("c2", "a", 0.0), ("c2", "b", 0.0)]
    summary = summarise(rows, NAMES)
    assert summary["classes"]["a"]["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert summary["foreground"]["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    write_results(rows, summary, str(tmp_path))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "case,class,label,dice,both_empty" and len(lines) == 5
    assert json.loads((tmp_path / "summary.json").read_text())["cases"] == ["c1", "c2"]
    assert not list(tmp_path.glob("*.tmp"))
