"""benchmarks/accuracy.py's pure parts on hand-made results: the gap fraction, paired gains,
the strongest baseline, the oracle's test cases, the tables, recipe parsing, seeds and the
resume key. No training."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_accuracy",
                                               ROOT / "benchmarks" / "accuracy.py")
acc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = acc  # dataclasses look their module up there
_spec.loader.exec_module(acc)


def test_gap_fraction_ends_middle_and_no_gap():
    assert acc.gap_fraction(0.6, 0.6, 0.8) == 0.0
    assert acc.gap_fraction(0.8, 0.6, 0.8) == pytest.approx(1.0)
    assert acc.gap_fraction(0.65, 0.6, 0.8) == pytest.approx(0.25)
    assert acc.gap_fraction(0.5, 0.6, 0.8) == pytest.approx(-0.5)   # worse than source-only
    # The oracle no better than source-only: no gap, no fraction (not a division by ~0).
    assert acc.gap_fraction(0.7, 0.6, 0.6) is None
    assert acc.gap_fraction(0.7, 0.6, 0.6 + 1e-9) is None
    assert acc.gap_fraction(0.7, 0.6, 0.5) is None
    assert acc.gap_fraction(None, 0.6, 0.8) is None


def test_gap_recovered_pairs_seeds_and_takes_means():
    recipe = {0: 0.70, 1: 0.64}
    source_only = {0: 0.60, 1: 0.60, 2: 0.66}
    oracle = {0: 0.80, 1: 0.70, 2: 0.80}
    got = acc.gap_recovered(recipe, source_only, oracle)
    assert got["paired_seeds"] == [0, 1]                    # seed 2 has no recipe run
    assert got["paired"]["values"] == pytest.approx([0.5, 0.4])
    assert got["paired"]["mean"] == pytest.approx(0.45)
    assert got["paired"]["std"] == pytest.approx(math.sqrt(0.005))
    # Of means, each over its own seeds: (0.67 - 0.62) / (0.7667 - 0.62)
    assert got["of_means"] == pytest.approx(0.05 / (2.3 / 3 - 0.62))
    # One seed where the oracle ties source-only: left out of the paired mean, and named.
    got = acc.gap_recovered({0: 0.7, 1: 0.7}, {0: 0.6, 1: 0.6}, {0: 0.8, 1: 0.6})
    assert got["undefined_seeds"] == [1] and got["paired"]["n"] == 1
    assert got["paired"]["mean"] == pytest.approx(0.5)
    got = acc.gap_recovered({0: 0.7}, {0: 0.6}, {0: 0.6})
    assert got["paired"]["mean"] is None and got["of_means"] is None


def test_paired_gains_and_wins():
    got = acc.paired_gains({0: 0.70, 1: 0.60, 2: 0.75}, {0: 0.65, 1: 0.62, 2: 0.70, 3: 0.9})
    assert got["seeds"] == [0, 1, 2]
    assert got["values"] == pytest.approx([0.05, -0.02, 0.05])
    assert got["mean"] == pytest.approx(0.08 / 3) and got["wins"] == 2 and got["n"] == 3
    one = acc.paired_gains({0: 0.7}, {0: 0.6, 1: 0.5})
    assert one["n"] == 1 and one["std"] == 0.0 and one["wins"] == 1
    assert acc.paired_gains({1: 0.7}, {0: 0.6})["mean"] is None


RECIPES = {"source_only": acc.Recipe("configs/demo.cfg", (), "baseline"),
           "augment": acc.Recipe("configs/source_only_augment_demo.cfg", (), "baseline"),
           "grl": acc.Recipe("configs/demo.cfg", ("--method=grl",)),
           "oracle": acc.Recipe("configs/demo.cfg", (), "oracle")}
CASES = ["lowfield_2", "lowfield_5"]


def _record(dice, surface=None, cases=CASES, domain="lowfield"):
    return {"target": {"dice": dice, "surface_dice": surface if surface is not None else dice / 2,
                       "domain": domain, "cases": list(cases)}}


def _runs(values):
    return {label: {s: _record(v) for s, v in by_seed.items()} for label, by_seed in
            values.items()}


def test_strongest_baseline_is_the_best_non_adaptive_mean():
    dice = {"source_only": {0: 0.6, 1: 0.62}, "augment": {0: 0.7, 1: 0.68},
            "grl": {0: 0.9}, "oracle": {0: 0.95}}
    assert acc.strongest_baseline(dice, RECIPES) == "augment"      # never grl nor the oracle
    assert acc.strongest_baseline({"grl": {0: 0.9}}, RECIPES) is None


def test_summarise_shift():
    runs = _runs({"source_only": {0: 0.60, 1: 0.62, 2: 0.58},
                  "augment": {0: 0.70, 1: 0.66, 2: 0.68},
                  "grl": {0: 0.72},
                  "oracle": {0: 0.80, 1: 0.82, 2: 0.78}})
    out = acc.summarise_shift(runs, RECIPES)
    assert out["strongest_baseline"] == "augment"
    grl = out["recipes"]["grl"]
    assert grl["seeds"] == [0] and grl["target_dice"]["mean"] == pytest.approx(0.72)
    assert grl["target_surface_dice"]["mean"] == pytest.approx(0.36)
    assert grl["gap_recovered"]["paired"]["mean"] == pytest.approx(0.6)
    assert grl["gap_recovered"]["of_means"] == pytest.approx(0.12 / 0.2)
    assert grl["gain_over_strongest_baseline"]["values"] == pytest.approx([0.02])
    assert "gain_over_strongest_baseline" not in out["recipes"]["augment"]
    so = out["recipes"]["source_only"]
    assert so["gap_recovered"]["paired"]["mean"] == 0.0
    assert so["gain_over_strongest_baseline"]["wins"] == 0
    assert out["recipes"]["oracle"]["gap_recovered"]["of_means"] == pytest.approx(1.0)


def test_selection_picks_replay_each_criterion_on_the_curves():
    curves = {"val_dice": [[0, 0.5], [1, 0.8], [2, 0.8], [3, 0.7]],      # tie: first kept
              "target_entropy": [[0, 0.3], [1, 0.2], [2, 0.25], [3, 0.1]],  # lowest wins
              "target_agreement": [[0, 0.9], [1, float("nan")], [2, 0.95]],
              "oracle/val_dice": [[0, 0.40], [1, 0.55], [2, 0.60], [3, 0.50]]}
    picks = acc.selection_picks(curves)
    assert {c: p["epoch"] for c, p in picks.items()} == {
        "source_dice": 1, "target_entropy": 3, "target_agreement": 2, "target_labels": 2}
    assert picks["target_entropy"]["target_val_dice"] == 0.50
    assert acc.selection_picks({"val_dice": curves["val_dice"]}) == {}  # nothing to score


def test_selection_summary_pairs_seeds_and_leaves_out_the_oracle():
    def record(val_dice, target):
        return {"curves": {"val_dice": [[e, v] for e, v in enumerate(val_dice)],
                           "oracle/val_dice": [[e, v] for e, v in enumerate(target)]}}
    runs = {"grl": {0: record([0.7, 0.9], [0.6, 0.5]), 1: record([0.8, 0.7], [0.4, 0.7])},
            "oracle": {0: record([0.7, 0.9], [0.6, 0.5])}}
    out = acc.summarise_selection(runs, RECIPES)
    assert list(out) == ["grl"]
    dice = out["grl"]["source_dice"]
    assert dice["epochs"] == {0: 1, 1: 0}
    assert dice["target_val_dice"]["values"] == pytest.approx([0.5, 0.4])
    assert dice["shortfall"]["values"] == pytest.approx([0.1, 0.3])
    assert out["grl"]["target_labels"]["shortfall"]["mean"] == 0.0
    rows = acc.format_selection(out)
    assert rows[0] == "| recipe | source_dice | target_labels |"
    assert rows[2].startswith("| grl | 0.450 ± 0.071 (ep 1,0, −0.200) | 0.650 ± 0.071 (ep 0,1) |")
    assert "selection" in acc.summarise_shift(_runs({"grl": {0: 0.7}}), RECIPES)


def test_oracle_must_be_scored_on_the_same_target_test_cases():
    runs = _runs({"source_only": {0: 0.6}, "oracle": {0: 0.8}})
    assert acc.check_same_test_cases(runs) == CASES
    runs["oracle"][0] = _record(0.8, cases=["lowfield_2", "lowfield_9"])
    with pytest.raises(ValueError, match="different target test cases.*lowfield_9"):
        acc.check_same_test_cases(runs)
    runs["oracle"][0] = _record(0.8, domain="scanner_b")
    with pytest.raises(ValueError, match="scanner_b"):
        acc.check_same_test_cases(runs)


def _evaluation(domain, dice, cases):
    summary = {"foreground": {"dice": {"mean": dice}, "surface_dice": {"mean": dice - 0.1}},
               "cases": cases, "classes": {"GM": {"dice": {"mean": dice}}},
               "surface_dice_tolerance_mm": 1.0, "grid": "prepared"}
    return {"domain": domain, "summary": summary}


def test_run_record_reads_the_oracles_source_evaluation_as_the_target():
    result = {"method": "source_only", "best_epoch": 3, "train_seconds": 10.0,
              "selection": {"select_on": "source_dice", "monitor": "val_dice", "best": 0.9,
                            "best_epoch": 3, "epoch_logs": {"val_dice": 0.9}},
              "evaluations": {"source": _evaluation("lowfield", 0.8, CASES),
                              "target": _evaluation("scanner_a", 0.5, ["scanner_a_1"])}}
    oracle = acc.run_record(result, "oracle")
    assert oracle["target"]["domain"] == "lowfield" and oracle["target"]["dice"] == 0.8
    assert oracle["target"]["surface_dice"] == pytest.approx(0.7)
    assert oracle["source_test"]["domain"] == "scanner_a"
    assert oracle["selection"] == {"select_on": "source_dice", "monitor": "val_dice",
                                   "best": 0.9, "best_epoch": 3}
    recipe = acc.run_record(result, "adaptive")
    assert recipe["target"]["domain"] == "scanner_a"
    del result["evaluations"]["target"]
    with pytest.raises(ValueError, match="no 'target' evaluation"):
        acc.run_record(result, "baseline")


def test_tables_format_values_and_missing_ones():
    runs = _runs({"source_only": {0: 0.60, 1: 0.62}, "augment": {0: 0.70, 1: 0.66},
                  "grl": {0: 0.55}, "oracle": {0: 0.60, 1: 0.62}})
    shift = acc.summarise_shift(runs, RECIPES)
    lines = acc.format_table(shift)
    assert lines[0].startswith("| recipe |") and "gain vs augment" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    row = {line.split(" | ")[0]: line for line in lines[2:]}
    assert "| 0,1 | 0.610 ± 0.014 |" in row["| source_only (baseline)"]
    # The oracle ties source-only here: the gap columns say so instead of dividing by zero.
    assert "| – | – |" in row["| grl"] and "| −0.150 ± 0.000 | 0/1 |" in row["| grl"]
    out = {"shifts": ["lowfield"], "date": "main, 2026-12-01", "command": "python x",
           "subjects_per_domain": 6, "split": "0.6,0.1,0.3", "n_test_cases": 2,
           "source_domain": "scanner_a", "budget": {"epochs": 1, "steps_per_epoch": 5},
           "select_on": "source_dice", "seeds": [0, 1], "other_seeds": [0],
           "surface_dice_tolerance_mm": 1.0, "summary": {"lowfield": shift},
           "failed": ["t2like-grl-seed0"]}
    text = acc.format_markdown(out)
    assert text.startswith("## Accuracy against the oracle on 1 phantom shift (")
    assert "### scanner_a → lowfield" in text and "\n".join(lines) in text
    flat = " ".join(text.split())   # the set-up paragraph is wrapped
    assert "1 x 5 steps" in flat and "seeds [0, 1] for the core recipes, [0] for" in flat
    assert "1.0 mm tolerance" in flat
    assert "Failed runs (left out above): t2like-grl-seed0" in text
    assert "seed 0 for every recipe (--quick)" in " ".join(
        acc.format_markdown({**out, "quick": True, "seeds": [0]}).split())
    assert acc.fmt_stat({"mean": 0.123, "std": 0.05}, signed=True, percent=True) == "+12 % ± 5 %"
    assert acc.fmt_stat({"mean": -0.5, "std": 0.0}, signed=True) == "−0.500 ± 0.000"


def test_recipe_specs_and_the_table():
    label, recipe = acc.parse_recipe("baseline:gin=configs/demo.cfg+--augment=gin+--seed=1")
    assert label == "gin" and recipe == acc.Recipe("configs/demo.cfg",
                                                   ("--augment=gin", "--seed=1"), "baseline")
    assert acc.parse_recipe("mt=configs/demo.cfg")[1].role == "adaptive"
    for bad, why in (("gin", "is not"), ("gin=", "is not"), ("=configs/demo.cfg", "is not"),
                     ("teacher:mt=configs/demo.cfg", "role 'teacher'"),
                     ("mt=configs/demo.cfg+augment=gin", "not --flag=value")):
        with pytest.raises(ValueError, match=why):
            acc.parse_recipe(bad)
    table = acc.recipe_table(acc.RECIPES, ["baseline:gin=configs/demo.cfg+--augment=gin"],
                             ["source_only", "gin", "oracle"])
    assert list(table) == ["source_only", "gin", "oracle"] and table["gin"].role == "baseline"
    with pytest.raises(ValueError, match="unknown.*nope"):
        acc.recipe_table(acc.RECIPES, [], ["source_only", "nope", "oracle"])
    with pytest.raises(ValueError, match="must include.*oracle"):
        acc.recipe_table(acc.RECIPES, [], ["source_only", "grl"])
    with pytest.raises(ValueError, match="does not exist"):
        acc.recipe_table(acc.RECIPES, ["x=configs/missing.cfg"], ["source_only", "x", "oracle"])
    with pytest.raises(ValueError, match="exactly one oracle"):
        acc.recipe_table(acc.RECIPES, ["oracle:o2=configs/demo.cfg"],
                         ["source_only", "o2", "oracle"])
    # The built-in table: every flagfile exists, and the gap's two ends have their roles.
    assert acc.recipe_table(acc.RECIPES, [], list(acc.RECIPES)) == acc.RECIPES
    assert acc.RECIPES["oracle"].role == "oracle"
    assert acc.RECIPES["source_only"].role == "baseline"


def test_seeds_per_recipe():
    base, adaptive = acc.RECIPES["source_only"], acc.RECIPES["grl"]
    args = ([0, 1, 2], [0], ["minent"])
    assert acc.seeds_for("source_only", base, *args, quick=False) == [0, 1, 2]
    assert acc.seeds_for("oracle", acc.RECIPES["oracle"], *args, quick=False) == [0, 1, 2]
    assert acc.seeds_for("grl", adaptive, *args, quick=False) == [0]
    assert acc.seeds_for("minent", acc.RECIPES["minent"], *args, quick=False) == [0, 1, 2]
    assert acc.seeds_for("source_only", base, *args, quick=True) == [0]


def test_a_second_stage_follows_its_first():
    for order in (["source_only", "attent_self_training", "attent", "oracle"],
                  ["source_only", "attent_self_training", "oracle"]):
        with pytest.raises(ValueError, match="continues from attent"):
            acc.recipe_table(acc.RECIPES, [], order)
    second = acc.RECIPES["attent_self_training"]
    assert second.after == "attent"
    # it runs with its first stage's seeds
    assert acc.seeds_for("attent_self_training", second, [0, 1, 2], [0], ["attent"],
                         quick=False) == [0, 1, 2]
    assert acc.seeds_for("attent_self_training", second, [0, 1, 2], [0], [],
                         quick=False) == [0]
    # after a baseline (a core recipe), every seed
    after_baseline = acc.RECIPES["randomized_self_training"]
    assert acc.RECIPES[after_baseline.after].role == "baseline"
    assert acc.seeds_for("randomized_self_training", after_baseline, [0, 1, 2], [0], [],
                         quick=False) == [0, 1, 2]


def test_oracle_trains_on_the_target():
    kw = dict(name="lowfield-oracle-seed1", source="scanner_a", target="lowfield", seed=1,
              prepared="/d", runs="/r", tracking_uri="sqlite:///m.db", epochs=2,
              steps_per_epoch=5, select_on="source_dice", extra=["--x=1"])
    args = acc.train_args(acc.RECIPES["oracle"], **kw)
    assert "--source_domain=lowfield" in args and "--target_domain=scanner_a" in args
    assert args[-1] == "--x=1" and "--select_on=source_dice" in args and "--epochs=2" in args
    args = acc.train_args(acc.RECIPES["grl"], **kw)
    assert "--source_domain=scanner_a" in args and "--target_domain=lowfield" in args
    assert args.index("--method=grl") > args.index(next(a for a in args
                                                        if a.startswith("--flagfile=")))


def test_resume_key_and_run_state(tmp_path):
    key = acc.run_key(["-m", "uda_tf.cli.train", "--seed=0"], {"subjects_per_domain": 6})
    key_path, run_dir = tmp_path / "keys" / "r.json", tmp_path / "runs" / "r"
    result = run_dir / "result.json"
    state = lambda k: acc.run_state(str(key_path), str(result), str(run_dir), k)  # noqa: E731
    assert state(key) == "fresh"                            # never started
    key_path.parent.mkdir()
    key_path.write_text(json.dumps(key))
    assert state(key) == "fresh"                            # started, nothing to resume
    (run_dir / "backup" / "step-000000005").mkdir(parents=True)
    assert state(key) == "resume"
    result.write_text("{}")
    assert state(key) == "done"
    # Other arguments or other data: not this run's result.
    assert state(acc.run_key(["-m", "uda_tf.cli.train", "--seed=1"], key["data"])) == "fresh"
    assert state(acc.run_key(key["args"], {"subjects_per_domain": 20})) == "fresh"


def test_ensure_run_reuses_resumes_and_retrains(tmp_path, monkeypatch):
    calls = []

    def fake_train(title, args):
        calls.append(args[-1])
        return args[-1] != "--resume"        # a resume that fails falls back to a new run

    monkeypatch.setattr(acc, "_train", fake_train)
    runs, keys = tmp_path / "runs", tmp_path / "keys"
    key = acc.run_key(["a"], {"d": 1})
    assert acc.ensure_run("r", ["a"], key, str(runs), str(keys)) is not None
    assert calls == ["--overwrite"] and json.loads((keys / "r.json").read_text()) == key
    (runs / "r" / "backup" / "step-000000001").mkdir(parents=True)
    acc.ensure_run("r", ["a"], key, str(runs), str(keys))
    assert calls[1:] == ["--resume", "--overwrite"]
    (runs / "r" / "result.json").write_text("{}")
    calls.clear()
    assert acc.ensure_run("r", ["a"], key, str(runs), str(keys)).endswith("result.json")
    assert calls == []                                       # reused
    other = acc.run_key(["b"], {"d": 1})
    monkeypatch.setattr(acc, "_train", lambda title, args: False)
    assert acc.ensure_run("r", ["b"], other, str(runs), str(keys)) is None
    assert not (runs / "r" / "result.json").exists()        # the old result cannot pass


def test_read_curves_from_the_newest_backup(tmp_path):
    for step, value in ((5, 0.1), (10, 0.2)):
        d = tmp_path / "backup" / f"step-{step:09d}"
        d.mkdir(parents=True)
        history = {"val_dice": [[0, 0.05], [1, value]], "other": [[0, 1.0]]}
        (d / "state.json").write_text(json.dumps(
            {"callbacks": {"epoch_logger": {"history": history}}}))
    assert acc.read_curves(str(tmp_path)) == {"val_dice": [[0, 0.05], [1, 0.2]]}
    assert acc.read_curves(str(tmp_path / "nothing")) == {}


def test_run_key_leaves_out_the_checkout_and_follows_config_edits(tmp_path, monkeypatch):
    args = ["-m", "uda_tf.cli.train", f"--flagfile={acc.REPO}/configs/demo.cfg", "--seed=0"]
    assert acc.run_key(args, {})["args"][2] == "--flagfile=configs/demo.cfg"
    # An included flagfile is part of the digest: editing demo.cfg changes adabn's key.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.cfg").write_text("--epochs=6\n")
    (tmp_path / "configs" / "adabn.cfg").write_text("--flagfile=demo.cfg\n--adabn\n")
    monkeypatch.setattr(acc, "REPO", str(tmp_path))
    before = acc.flagfile_digest("configs/adabn.cfg")
    assert before == acc.flagfile_digest("configs/adabn.cfg")
    (tmp_path / "configs" / "demo.cfg").write_text("--epochs=7\n")
    assert acc.flagfile_digest("configs/adabn.cfg") != before
    # a shipped config included by name (uda:NAME) is followed too: the same text including
    # another config is another run
    (tmp_path / "a.cfg").write_text("--flagfile=uda:demo\n")
    (tmp_path / "b.cfg").write_text("--flagfile=uda:demo\n")
    (tmp_path / "c.cfg").write_text("--flagfile=uda:minent_demo\n")
    assert acc.flagfile_digest("a.cfg") == acc.flagfile_digest("b.cfg")
    assert acc.flagfile_digest("a.cfg") != acc.flagfile_digest("c.cfg")
