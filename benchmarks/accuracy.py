"""How much of the gap to a target-trained model does each recipe recover? Shifts x recipes x
seeds against the oracle, one command, resumable.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/accuracy.py            # hours on 2 cores
    PYTHONPATH=$PWD .venv/bin/python benchmarks/accuracy.py --quick    # one seed, short runs

Generates one phantom (scanner_a, scanner_b, lowfield, t2like; 20 subjects per domain, split
0.6/0.1/0.3, so 6 test volumes per domain) and prepares it once, then trains every recipe of
RECIPES on every shift (scanner_a labelled source -> each target) with its seeds, through
train.py as a user would. Checkpoints are chosen without target labels (--select_on, default
train.py's source_dice). The oracle is the same network and budget trained on the target's own
labelled train cases (train.py with source and target swapped), scored on exactly the target
test cases the other recipes are scored on (checked from the case ids).

Reports per shift x recipe: target test Dice and surface Dice (mean +- std over seeds), the
fraction of the source-only -> oracle gap recovered, and the paired per-seed gain over the
strongest non-adaptive baseline. Writes benchmarks/results/accuracy.json (atomically), a
section for benchmarks/RESULTS.md (accuracy.md) and a figure (accuracy.png): target Dice per
recipe and shift against the source-only and oracle levels, and the source-only and oracle
validation learning curves.

Resumable: each run's key (its train.py arguments and the data's parameters) is written under
<output_root>/keys/ before it starts; a run whose result.json exists under the same key is
reused, an interrupted one is continued with train.py --resume from its last backup. A failed
run is listed and the others go on; the script then exits non-zero.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from uda_tf.cli.demo import _step  # noqa: E402  (the demo's quiet subprocess runner)
from uda_tf.data.sharding import read_json, write_json_atomic  # noqa: E402
from uda_tf.files import atomic_write  # noqa: E402

ROLES = ("adaptive", "baseline", "oracle")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row of the benchmark: a flagfile (relative to the repository) and flags after it.
    role: "baseline" = non-adaptive (the paired gains are taken over the best of these),
    "oracle" = trained on the target's labels (source and target swapped), else "adaptive".
    after: the label of an earlier recipe whose kept checkpoint (same shift and seed)
    initialises this one (--init_checkpoint): a second stage, run with that recipe's seeds."""
    flagfile: str
    flags: tuple[str, ...] = ()
    role: str = "adaptive"
    after: str = ""


# Adding a recipe is one line (or --add_recipe on the command line).
RECIPES: dict[str, Recipe] = {
    "source_only": Recipe("configs/demo.cfg", ("--method=source_only",), "baseline"),
    "source_only_augment": Recipe("configs/source_only_augment_demo.cfg", (), "baseline"),
    "adabn": Recipe("configs/adabn_demo.cfg"),
    "grl": Recipe("configs/demo.cfg", ("--method=grl",)),
    "adversarial": Recipe("configs/adversarial_demo.cfg"),
    "minent": Recipe("configs/minent_demo.cfg"),
    "self_training": Recipe("configs/self_training_demo.cfg"),
    "source_only_randomized": Recipe("configs/source_only_augment_demo.cfg",
                                     ("--augment=randomized",), "baseline"),
    "source_only_gin": Recipe("configs/source_only_augment_demo.cfg", ("--augment=full_gin",),
                              "baseline"),
    "source_only_curve": Recipe("configs/source_only_augment_demo.cfg",
                                ("--augment=full_curve",), "baseline"),
    # Every labelled image randomised (SynthSeg's setting), and the same with each region's
    # texture mirrored half of the time (label_intensity_texture_flip: partial-volume borders
    # no longer show the source contrast's tissue order).
    "source_only_synthseg": Recipe("configs/source_only_augment_demo.cfg", (
        "--augment=randomized", "--augment_params=p_label_intensity=1.0"), "baseline"),
    "source_only_synthseg_flip": Recipe("configs/source_only_augment_demo.cfg", (
        "--augment=randomized",
        "--augment_params=p_label_intensity=1.0,label_intensity_texture_flip=0.5"), "baseline"),
    "mean_teacher": Recipe("configs/mean_teacher_demo.cfg"),
    "mean_teacher_randomized": Recipe("configs/mean_teacher_demo.cfg", (
        "--augment=randomized", "--mt_student_augment=full_gin")),
    # Pixel-level (issue 15): AttENT, the same without attention gates (plain CycleGAN
    # translators), and translate-then-self-train (AttENT's segmentor, then self-training).
    "attent": Recipe("configs/attent_demo.cfg"),
    "cyclegan_entropy": Recipe("configs/attent_demo.cfg", ("--attention_gates=false",)),
    "attent_self_training": Recipe("configs/self_training_demo.cfg", (), after="attent"),
    # Domain-randomised augmentation, then self-training on the target's confident
    # pseudo-labels from its kept checkpoint (the crossMoDA winners' second stage, after an
    # augmentation that already bridges the contrast instead of a translation).
    "randomized_self_training": Recipe("configs/self_training_demo.cfg",
                                       ("--augment=randomized",),
                                       after="source_only_randomized"),
    # The same second stage after the labels-only intensities with mirrored textures (the
    # cross-modality baseline): pseudo-labels from a segmentor that already sees T2 tissue.
    "synthseg_flip_self_training": Recipe("configs/self_training_demo.cfg", (
        "--augment=randomized",
        "--augment_params=p_label_intensity=1.0,label_intensity_texture_flip=0.5"),
        after="source_only_synthseg_flip"),
    "oracle": Recipe("configs/demo.cfg", ("--method=source_only",), "oracle"),
}
SOURCE_ONLY, ORACLE = "source_only", "oracle"
DEFAULT_SHIFTS = ("scanner_b", "lowfield", "t2like")
# Per-epoch values kept from each run for the learning curves (and later selection studies).
CURVE_KEYS = ("val_dice", "oracle/val_dice", "target_entropy", "target_agreement",
              "target_teacher_agreement", "seg_loss", "val_seg_loss")
# The checkpoint-selection study: the label-free criteria of train.py --select_on, each
# replayed on a run's per-epoch curves against the target validation Dice (TARGET_VAL_DICE,
# read to score the choice, never to make it).
SELECTION_CRITERIA = ("source_dice", "target_entropy", "target_agreement",
                      "target_teacher_agreement")
TARGET_VAL_DICE = "oracle/val_dice"
# Budgets (epochs, steps per epoch). FULL: measured on scanner_a -> lowfield, seed 0, 24 x 50
# steps: the source-only run's source validation Dice was 0.901 after epoch 14, 0.900 after 20 and
# 0.902 after 24 (its target validation Dice 0.48-0.52 from epoch 4 on); the oracle's 0.788,
# 0.803 and 0.804. 20 x 50 is within 0.01 of the longer run for both.
FULL_BUDGET, QUICK_BUDGET = (20, 50), (6, 50)
LABEL_FREE = ("source_dice", "target_entropy", "target_agreement")

FLAGS = flags.FLAGS
_OUT = os.path.join(REPO, "benchmarks", "results", "accuracy")


def define_flags():
    """The command's flags, defined when it runs: importing this module (the tests do) must
    not collide with train.py's flags of the same names in that process."""
    flags.DEFINE_string("output_root", "/tmp/uda_accuracy", "Data, runs, keys and MLflow store.")
    flags.DEFINE_string("source_domain", "scanner_a", "Labelled source domain of every shift.")
    flags.DEFINE_list("shifts", list(DEFAULT_SHIFTS), "Target domains (phantom domains).")
    flags.DEFINE_list("recipes", list(RECIPES), "Recipes to run, by label (RECIPES, --add_recipe); "
                      "must include source_only and oracle, the two ends of the gap.")
    flags.DEFINE_multi_string("add_recipe", [], "[role:]label=flagfile[+--flag=value...], role "
                              "baseline, oracle or adaptive (default), e.g. "
                              "baseline:source_only_gin=configs/demo.cfg+--augment=gin.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of the core recipes: the "
                      "baselines, the oracle and --all_seeds_recipes.")
    flags.DEFINE_list("other_seeds", ["0"], "Training seeds of the other recipes.")
    flags.DEFINE_list("all_seeds_recipes", [], "Further recipes trained with every --seeds.")
    flags.DEFINE_boolean("quick", False, "One seed (the first of --seeds) for every recipe and "
                         f"a budget of {QUICK_BUDGET[0]}x{QUICK_BUDGET[1]} steps unless --epochs/"
                         "--steps_per_epoch are given.")
    flags.DEFINE_integer("epochs", FULL_BUDGET[0], "Epochs per run.", lower_bound=1)
    flags.DEFINE_integer("steps_per_epoch", FULL_BUDGET[1], "Steps per epoch.", lower_bound=1)
    flags.DEFINE_enum("select_on", "source_dice", LABEL_FREE, "Checkpoint selection (label-free "
                      "only: target labels are read by the final test evaluation alone).")
    flags.DEFINE_integer("subjects_per_domain", 20, "Phantom subjects per domain.", lower_bound=3)
    flags.DEFINE_string("split", "0.6,0.1,0.3", "Train/val/test fractions per domain.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the phantom and of the case split.")
    flags.DEFINE_multi_string("train_flag", [], "Extra flag for every run (part of its key).")
    flags.DEFINE_boolean("rerun", False, "Train every run again even if its result exists.")
    flags.DEFINE_string("json_out", _OUT + ".json", "Results JSON (written atomically).")
    flags.DEFINE_string("md_out", _OUT + ".md", "Markdown section for benchmarks/RESULTS.md.")
    flags.DEFINE_string("png_out", _OUT + ".png", "Figure: target Dice bars and learning curves.")


# -- recipes and seeds -----------------------------------------------------------------------
def parse_recipe(spec: str) -> tuple[str, Recipe]:
    """"[role:]label=flagfile[+--flag=value...]" -> (label, Recipe); ValueError otherwise."""
    head, sep, body = spec.partition("=")
    role, _, label = head.rpartition(":")
    role = role or "adaptive"
    path, *extra = body.split("+")
    if not sep or not label or not path:
        raise ValueError(f"--add_recipe: {spec!r} is not [role:]label=flagfile[+--flag=value...]")
    if role not in ROLES:
        raise ValueError(f"--add_recipe: {spec!r} has role {role!r}; expected one of {ROLES}")
    bad = [e for e in extra if not e.startswith("--")]
    if bad:
        raise ValueError(f"--add_recipe: {bad} (in {spec!r}) are not --flag=value")
    return label, Recipe(path, tuple(extra), role)


def recipe_table(table: dict, added, wanted) -> dict[str, Recipe]:
    """{label: Recipe} of the `wanted` labels, from `table` plus the `added` specs, in
    `wanted` order; ValueError for an unknown label, a missing end of the gap, a flagfile
    that does not exist or a second oracle."""
    table = dict(table)
    table.update(parse_recipe(spec) for spec in added)
    unknown = [w for w in wanted if w not in table]
    if unknown:
        raise ValueError(f"--recipes: unknown {unknown}; known: {', '.join(table)}")
    missing = [w for w in (SOURCE_ONLY, ORACLE) if w not in wanted]
    if missing:
        raise ValueError(f"--recipes must include {missing}: the gap runs from source_only "
                         "to the oracle")
    chosen = {w: table[w] for w in dict.fromkeys(wanted)}
    order = list(chosen)
    for label, recipe in chosen.items():
        if recipe.after and (recipe.after not in chosen
                             or order.index(recipe.after) > order.index(label)):
            raise ValueError(f"--recipes: {label} continues from {recipe.after}, which must "
                             "come before it in --recipes")
    if table[ORACLE].role != "oracle" or sum(r.role == "oracle" for r in chosen.values()) != 1:
        raise ValueError("--recipes: exactly one oracle recipe, labelled 'oracle', is expected")
    for label, recipe in chosen.items():
        path = os.path.join(REPO, recipe.flagfile)
        if not os.path.isfile(path):
            raise ValueError(f"--recipes: {recipe.flagfile} (for {label}) does not exist")
    return chosen


def seeds_for(label: str, recipe: Recipe, seeds, other_seeds, all_seeds_recipes, quick):
    """The training seeds of one recipe: all of `seeds` for the core recipes (baselines, the
    oracle, `all_seeds_recipes`), `other_seeds` for the rest; the first seed only if quick."""
    if quick:
        return list(seeds[:1])
    if recipe.after:  # a second stage: wherever its first stage ran
        first = RECIPES.get(recipe.after, Recipe(""))
        return seeds_for(recipe.after, first, seeds, other_seeds, all_seeds_recipes, quick)
    core = recipe.role in ("baseline", "oracle") or label in all_seeds_recipes
    return list(seeds if core else other_seeds)


# -- statistics ------------------------------------------------------------------------------
def mean_std(values) -> dict:
    """{"mean", "std" (sample, 0 for one value), "n", "values"}; None values left out, and
    mean/std None when nothing is left."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "values": values}


def gap_fraction(recipe: float, source_only: float, oracle: float, eps: float = 1e-6):
    """(recipe - source_only) / (oracle - source_only): 0 at source-only, 1 at the oracle.
    None when the oracle is no better than source-only by more than `eps`: there is no gap to
    recover (a fraction of it would be noise divided by noise, or of the wrong sign)."""
    if None in (recipe, source_only, oracle) or oracle - source_only <= eps:
        return None
    return (recipe - source_only) / (oracle - source_only)


def gap_recovered(recipe: dict, source_only: dict, oracle: dict) -> dict:
    """Gap fraction from {seed: value} dicts: per seed over the seeds all three share
    ("paired": mean_std of the per-seed fractions), and of the means over each one's own
    seeds ("of_means")."""
    common = sorted(set(recipe) & set(source_only) & set(oracle))
    paired = [gap_fraction(recipe[s], source_only[s], oracle[s]) for s in common]
    means = [mean_std(d.values())["mean"] for d in (recipe, source_only, oracle)]
    return {"paired": mean_std(paired), "paired_seeds": common,
            "undefined_seeds": [s for s, f in zip(common, paired) if f is None],
            "of_means": gap_fraction(*means)}


def paired_gains(recipe: dict, baseline: dict) -> dict:
    """recipe - baseline per seed both have ({seed: value}): mean_std of the gains plus
    "wins" (gains > 0) and "seeds"."""
    common = sorted(set(recipe) & set(baseline))
    gains = [recipe[s] - baseline[s] for s in common]
    return {**mean_std(gains), "wins": sum(g > 0 for g in gains), "seeds": common}


def strongest_baseline(per_seed: dict, recipes: dict) -> str | None:
    """The non-adaptive recipe with the highest mean target Dice ({label: {seed: dice}})."""
    means = {label: mean_std(per_seed[label].values())["mean"] for label, r in recipes.items()
             if r.role == "baseline" and per_seed.get(label)}
    means = {k: v for k, v in means.items() if v is not None}
    return max(means, key=means.get) if means else None


def selection_picks(curves: dict) -> dict:
    """Which epoch each label-free criterion keeps, replayed on one run's curves ({name:
    [[epoch, value], ...]}, as read_curves returns), and the target validation Dice of that
    epoch; "target_labels": the epoch with the best target validation Dice, the pick an
    oracle would make. {criterion: {"epoch", "target_val_dice"}} for the criteria whose curve
    the run logged; {} without a target validation curve. As train.py's checkpoint does, the
    first epoch of equal best values is kept."""
    from uda_tf.training.selection import selection_monitor
    target = {int(e): v for e, v in curves.get(TARGET_VAL_DICE, [])}
    if not target:
        return {}
    picks = {}
    for criterion in (*SELECTION_CRITERIA, "oracle"):
        key, mode = selection_monitor(criterion)
        points = [(int(e), v) for e, v in curves.get(key, []) if int(e) in target
                  and v is not None and not math.isnan(v)]
        if not points:
            continue
        sign = 1.0 if mode == "max" else -1.0
        epoch = max(points, key=lambda p: (sign * p[1], -p[0]))[0]
        picks["target_labels" if criterion == "oracle" else criterion] = {
            "epoch": epoch, "target_val_dice": target[epoch]}
    return picks


def summarise_selection(runs: dict, recipes: dict) -> dict:
    """Per adaptive or baseline recipe of one shift ({label: {seed: run record}}): for each
    criterion, the target validation Dice of its pick over seeds (mean_std) and its shortfall
    against the target-labels pick, paired per seed (mean_std). The oracle is left out (its
    own validation split is the target's)."""
    out = {}
    for label, by_seed in runs.items():
        if recipes[label].role == "oracle":
            continue
        picks = {seed: selection_picks(r.get("curves", {})) for seed, r in by_seed.items()}
        criteria = [c for c in (*SELECTION_CRITERIA, "target_labels")
                    if any(c in p for p in picks.values())]
        if "target_labels" not in criteria:
            continue
        out[label] = {c: {
            "target_val_dice": mean_std([p[c]["target_val_dice"] for p in picks.values()
                                         if c in p]),
            "shortfall": mean_std([p["target_labels"]["target_val_dice"]
                                   - p[c]["target_val_dice"] for p in picks.values()
                                   if c in p]),
            "epochs": {seed: p[c]["epoch"] for seed, p in picks.items() if c in p}}
            for c in criteria}
    return out


def summarise_shift(runs: dict, recipes: dict) -> dict:
    """Per recipe of one shift, from {label: {seed: run record}}: target Dice and surface Dice
    over seeds, the gap recovered and the paired gain over the strongest baseline."""
    dice = {label: {s: r["target"]["dice"] for s, r in by_seed.items()}
            for label, by_seed in runs.items()}
    best = strongest_baseline(dice, recipes)
    out = {"strongest_baseline": best, "recipes": {}}
    for label in recipes:
        if not runs.get(label):
            continue
        by_seed = runs[label]
        entry = {"role": recipes[label].role, "seeds": sorted(by_seed),
                 "target_dice": mean_std([r["target"]["dice"] for r in by_seed.values()]),
                 "target_surface_dice": mean_std(
                     [r["target"]["surface_dice"] for r in by_seed.values()]),
                 "gap_recovered": gap_recovered(dice[label], dice.get(SOURCE_ONLY, {}),
                                                dice.get(ORACLE, {}))}
        if best is not None and label != best:
            entry["gain_over_strongest_baseline"] = paired_gains(dice[label], dice[best])
        out["recipes"][label] = entry
    out["selection"] = summarise_selection(runs, recipes)
    return out


def check_same_test_cases(runs: dict) -> list[str]:
    """The oracle must be scored on exactly the target test cases of the other recipes:
    every run's target case ids must be equal. Returns the case ids; ValueError otherwise."""
    seen = {}
    for label, by_seed in runs.items():
        for seed, record in by_seed.items():
            seen[f"{label} seed {seed}"] = (record["target"]["domain"],
                                            tuple(record["target"]["cases"]))
    if len(set(seen.values())) > 1:
        raise ValueError("runs were scored on different target test cases: "
                         + "; ".join(f"{k}: {v[0]} {list(v[1])}" for k, v in seen.items()))
    return list(next(iter(seen.values()))[1]) if seen else []


# -- runs ------------------------------------------------------------------------------------
def train_args(recipe: Recipe, *, name, source, target, seed, prepared, runs, tracking_uri,
               epochs, steps_per_epoch, select_on, extra=()) -> list[str]:
    """The train.py arguments of one run (without --overwrite/--resume). The oracle trains
    on the target's labels: source and target swapped, so its "source" test is the target's."""
    if recipe.role == "oracle":
        source, target = target, source
    return ["-m", "uda_tf.cli.train", f"--flagfile={os.path.join(REPO, recipe.flagfile)}",
            *recipe.flags, f"--data_dir={prepared}", f"--output_dir={runs}",
            f"--run_name={name}", f"--source_domain={source}", f"--target_domain={target}",
            f"--mlflow_tracking_uri={tracking_uri}", "--mlflow_experiment=accuracy",
            f"--seed={seed}", f"--epochs={epochs}", f"--steps_per_epoch={steps_per_epoch}",
            f"--select_on={select_on}", *extra]


def flagfile_digest(path: str, _seen=None) -> str:
    """sha256 of a flagfile's text and of the flagfiles it includes (--flagfile=uda:NAME or
    a path relative to the including file, as train.py reads them; the top one relative to
    the repository, where train.py is run): an edited config is a different run."""
    from uda_tf.cli.entry import resolve_flagfile
    seen = _seen if _seen is not None else set()
    path = os.path.join(REPO, path)
    if path in seen:
        return ""
    seen.add(path)
    with open(path, "rb") as f:
        text = f.read()
    nested = [line.strip().split(b"=", 1)[1].decode() for line in text.splitlines()
              if line.strip().startswith(b"--flagfile=")]
    digest = hashlib.sha256(text)
    for name in nested:
        digest.update(flagfile_digest(resolve_flagfile(name, os.path.dirname(path)),
                                      seen).encode())
    return digest.hexdigest()


def run_key(args, data_key, flagfiles: str | None = None) -> dict:
    """What must be equal for a stored run to be reused: its arguments (the checkout's path
    left out, so a moved checkout reuses its runs), its data and its flagfiles' digest."""
    args = [a.replace(REPO + os.sep, "") for a in args]
    return {"args": args, "data": data_key, "flagfiles": flagfiles}


def run_state(key_path: str, result_path: str, run_dir: str, key: dict) -> str:
    """"done" (result.json under this very key), "resume" (started under this key, a training
    backup exists) or "fresh". The key is written before a run starts and a fresh run's old
    result.json is removed first, so a result.json next to a matching key is that run's."""
    if read_json(key_path) != key:
        return "fresh"
    if os.path.isfile(result_path):
        return "done"
    return "resume" if glob.glob(os.path.join(run_dir, "backup", "step-*")) else "fresh"


def _train(title: str, args: list[str]) -> bool:
    """One train.py subprocess through the demo's runner; False when it failed."""
    try:
        _step(title, args)
        return True
    except SystemExit as e:
        print(f"!!! {e}", file=sys.stderr, flush=True)
        return False


def ensure_run(name: str, args: list[str], key: dict, runs: str, keys: str, rerun=False):
    """Reuse, resume or train one run; returns its result.json path, or None if it failed."""
    run_dir = os.path.join(runs, name)
    result_path = os.path.join(run_dir, "result.json")
    key_path = os.path.join(keys, f"{name}.json")
    state = "fresh" if rerun else run_state(key_path, result_path, run_dir, key)
    if state == "done":
        print(f"=== {name}: reusing {result_path}", flush=True)
        return result_path
    if state == "resume" and _train(f"{name} (resumed)", [*args, "--resume"]):
        return result_path
    if os.path.isfile(result_path):
        os.remove(result_path)  # an older run's: must not pass for this key's
    os.makedirs(keys, exist_ok=True)
    write_json_atomic(key_path, key)
    return result_path if _train(name, [*args, "--overwrite"]) else None


def read_curves(run_dir: str, mlflow_info: dict | None = None, keys=CURVE_KEYS) -> dict:
    """Per-epoch values {name: [[epoch, value], ...]} of a finished run: the epoch logger's
    history in the newest training backup (<run_dir>/backup/step-*/state.json), else the
    run's MLflow metric history; {} when neither can be read."""
    for path in sorted(glob.glob(os.path.join(run_dir, "backup", "step-*", "state.json")),
                       reverse=True):
        state = read_json(path) or {}
        history = state.get("callbacks", {}).get("epoch_logger", {}).get("history")
        if history:
            return {k: [list(p) for p in history[k]] for k in keys if k in history}
    if not mlflow_info or not mlflow_info.get("run_id"):
        return {}
    try:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=mlflow_info["tracking_uri"])
        out = {k: sorted([m.step, m.value] for m in
                         client.get_metric_history(mlflow_info["run_id"], k)) for k in keys}
    except Exception as e:  # noqa: BLE001  (curves are a figure, not a result)
        print(f"no learning curves for {run_dir}: {e}", file=sys.stderr)
        return {}
    return {k: v for k, v in out.items() if v}


def _scores(evaluation: dict) -> dict:
    summary = evaluation["summary"]
    fg = summary["foreground"]
    return {"domain": evaluation["domain"], "cases": summary["cases"],
            "dice": fg["dice"]["mean"], "surface_dice": fg["surface_dice"]["mean"],
            "surface_dice_tolerance_mm": summary.get("surface_dice_tolerance_mm"),
            "grid": summary.get("grid"),
            "classes": {c: v["dice"]["mean"] for c, v in summary["classes"].items()}}


def run_record(result: dict, role: str, curves: dict | None = None) -> dict:
    """What the benchmark keeps of a run's result.json. "target": the shift's target test
    scores (for the oracle, its "source" evaluation: it trained on the target); "source_test":
    the benchmark's source domain's test scores; the selection criterion and kept epoch."""
    evals = result["evaluations"]
    target_role, source_role = ("source", "target") if role == "oracle" else ("target",
                                                                             "source")
    if target_role not in evals:
        raise ValueError(f"{result.get('run_dir')}: result.json has no {target_role!r} "
                         f"evaluation (has {sorted(evals)})")
    selection = {k: v for k, v in result.get("selection", {}).items() if k != "epoch_logs"}
    return {"method": result.get("method"), "run_dir": result.get("run_dir"),
            "target": _scores(evals[target_role]),
            "source_test": _scores(evals[source_role]) if source_role in evals else None,
            "selection": selection, "best_epoch": result.get("best_epoch"),
            "train_seconds": result.get("train_seconds"), "curves": curves or {}}


# -- reports ---------------------------------------------------------------------------------
def fmt_stat(stat: dict | None, *, signed=False, percent=False) -> str:
    """"0.677 ± 0.026" (or "+12 % ± 5 %"); "–" when there is no value."""
    if not stat or stat.get("mean") is None:
        return "–"
    scale, spec = (100.0, ".0f") if percent else (1.0, ".3f")
    sign = "+" if signed else ""
    unit = " %" if percent else ""
    mean = f"{stat['mean'] * scale:{sign}{spec}}{unit}".replace("-", "−")
    return f"{mean} ± {stat['std'] * scale:{spec}}{unit}"


def fmt_pct(value) -> str:
    return "–" if value is None else f"{100.0 * value:+.0f} %".replace("-", "−")


def format_table(shift: dict) -> list[str]:
    """Markdown rows of one shift's summary (summarise_shift), recipes in table order."""
    best = shift["strongest_baseline"]
    lines = [f"| recipe | seeds | target Dice | surface Dice | gap recovered (paired) | "
             f"gap recovered (of means) | gain vs {best or 'baseline'} (paired) | wins |",
             "|---|---|---|---|---|---|---|---|"]
    for label, e in shift["recipes"].items():
        gain = e.get("gain_over_strongest_baseline")
        wins = f"{gain['wins']}/{gain['n']}" if gain and gain["n"] else "–"
        role = {"baseline": " (baseline)", "oracle": " (target labels)"}.get(e["role"], "")
        lines.append(
            f"| {label}{role} | {','.join(map(str, e['seeds']))} | {fmt_stat(e['target_dice'])}"
            f" | {fmt_stat(e['target_surface_dice'])}"
            f" | {fmt_stat(e['gap_recovered']['paired'], signed=True, percent=True)}"
            f" | {fmt_pct(e['gap_recovered']['of_means'])}"
            f" | {fmt_stat(gain, signed=True) if gain else '–'} | {wins} |")
    return lines


def format_selection(selection: dict) -> list[str]:
    """Markdown rows of one shift's checkpoint-selection study (summarise_selection)."""
    if not selection:
        return []
    criteria = [c for c in (*SELECTION_CRITERIA, "target_labels")
                if any(c in e for e in selection.values())]
    lines = ["| recipe | " + " | ".join(criteria) + " |", "|---" * (len(criteria) + 1) + "|"]
    for label, entry in selection.items():
        cells = []
        for c in criteria:
            if c not in entry:
                cells.append("–")
                continue
            epochs = ",".join(str(entry[c]["epochs"][s]) for s in sorted(entry[c]["epochs"]))
            short = entry[c]["shortfall"]
            tail = "" if c == "target_labels" else f", −{short['mean']:.3f}".replace("−-", "+")
            cells.append(f"{fmt_stat(entry[c]['target_val_dice'])} (ep {epochs}{tail})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def format_markdown(out: dict) -> str:
    """The section for benchmarks/RESULTS.md: command, set-up, one table per shift."""
    budget = out["budget"]
    tolerance = out.get("surface_dice_tolerance_mm")
    n = len(out["shifts"])
    seeds = (f"seed {out['seeds'][0]} for every recipe (--quick)" if out.get("quick") else
             f"seeds {out['seeds']} for the core recipes, {out['other_seeds']} for the others")
    text = (f"One phantom ({out['subjects_per_domain']} subjects per domain, split "
            f"{out['split']}, {out['n_test_cases']} target test volumes per shift); source "
            f"{out['source_domain']}; {budget['epochs']} x {budget['steps_per_epoch']} steps "
            f"per run; checkpoints chosen by --select_on={out['select_on']} (no target "
            f"labels); {seeds}. Target Dice: foreground (CSF, GM, WM) mean per volume, mean ± "
            f"std over seeds; surface Dice at {tolerance if tolerance is not None else '?'} mm "
            "tolerance on the prepared 2 mm grid. Gap recovered: (recipe − source_only) / "
            "(oracle − source_only), per seed over the seeds shared with both ends (mean ± std) "
            "and of the means; – where the oracle is not above source-only. Gain: paired per "
            "seed against the strongest non-adaptive baseline of the shift.")
    lines = [f"## Accuracy against the oracle on {n} phantom shift{'s' * (n != 1)} "
             f"(`benchmarks/accuracy.py`), {out['date']}", "", "    " + out["command"], "",
             textwrap.fill(text, width=95), ""]
    for target, shift in out["summary"].items():
        lines += [f"### {out['source_domain']} → {target}", "", *format_table(shift), ""]
        if shift.get("selection"):
            lines += [textwrap.fill(
                "Checkpoint selection, replayed on each run's epochs: target validation Dice "
                "of the epoch each label-free criterion keeps (0-based epochs per seed, then "
                "the shortfall against the epoch the target labels would pick, last column; "
                "the target validation volumes' labels score the choices and make none "
                "of them).", width=95), "", *format_selection(shift["selection"]), ""]
    if out["failed"]:
        lines += [f"Failed runs (left out above): {', '.join(out['failed'])}", ""]
    return "\n".join(lines)


def _bars(ax, target: str, shift: dict):
    labels = list(shift["recipes"])
    means = [shift["recipes"][k]["target_dice"]["mean"] for k in labels]
    stds = [shift["recipes"][k]["target_dice"]["std"] for k in labels]
    colours = [{"baseline": "tab:grey", "oracle": "tab:green"}.get(
        shift["recipes"][k]["role"], "tab:blue") for k in labels]
    ax.bar(range(len(labels)), means, yerr=stds, color=colours, capsize=3)
    for label, style, colour in ((SOURCE_ONLY, "--", "black"), (ORACLE, ":", "tab:green")):
        if label in shift["recipes"]:
            ax.axhline(shift["recipes"][label]["target_dice"]["mean"], ls=style, color=colour,
                       lw=1, label=f"{label} level")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"→ {target}: target test Dice", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _curves(ax, target: str, runs: dict):
    """Validation Dice per epoch of the source-only and oracle runs (one line per seed)."""
    series = ((SOURCE_ONLY, "val_dice", "tab:grey", "source_only: source val"),
              (SOURCE_ONLY, "oracle/val_dice", "black", "source_only: target val"),
              (ORACLE, "val_dice", "tab:green", "oracle: target val"))
    for label, key, colour, name in series:
        for i, (seed, record) in enumerate(sorted(runs.get(label, {}).items())):
            points = record.get("curves", {}).get(key)
            if points:
                epochs, values = zip(*points)
                ax.plot([e + 1 for e in epochs], values, color=colour, lw=1, marker=".",
                        label=name if i == 0 else None)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"→ {target}: validation Dice per epoch", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def plot_results(out: dict, runs: dict, path: str) -> None:
    """Target Dice bars per shift (top row) over the validation learning curves of the
    source-only and oracle runs (bottom row); written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    shifts = list(out["summary"])
    fig = Figure(figsize=(4.2 * max(1, len(shifts)), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, max(1, len(shifts)), squeeze=False)
    for col, target in enumerate(shifts):
        _bars(axes[0][col], target, out["summary"][target])
        _curves(axes[1][col], target, runs.get(target, {}))
    fig.suptitle(f"{out['source_domain']} → each target; {out['budget']['epochs']} x "
                 f"{out['budget']['steps_per_epoch']} steps per run", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, None) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# -- the command -----------------------------------------------------------------------------
def _ints(values, flag):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{flag} must be integers, got {values}") from None


def parse_config() -> dict:
    """The checked settings of this invocation (UsageError naming the flag otherwise)."""
    from uda_tf.data.phantom import DOMAINS
    try:
        recipes = recipe_table(RECIPES, FLAGS.add_recipe, FLAGS.recipes)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    bad = [s for s in FLAGS.shifts if s not in DOMAINS or s == FLAGS.source_domain]
    if bad or not FLAGS.shifts or FLAGS.source_domain not in DOMAINS:
        raise app.UsageError(f"--shifts={FLAGS.shifts}, --source_domain={FLAGS.source_domain}"
                             f": expected phantom domains from {', '.join(DOMAINS)}, the "
                             "shifts other than the source")
    unknown = [r for r in FLAGS.all_seeds_recipes if r not in recipes]
    if unknown:
        raise app.UsageError(f"--all_seeds_recipes: {unknown} are not in --recipes")
    seeds, other = _ints(FLAGS.seeds, "seeds"), _ints(FLAGS.other_seeds, "other_seeds")
    if not seeds or not other:
        raise app.UsageError("--seeds and --other_seeds need at least one seed each")
    epochs, steps = FLAGS.epochs, FLAGS.steps_per_epoch
    if FLAGS.quick:
        epochs = epochs if FLAGS["epochs"].present else QUICK_BUDGET[0]
        steps = steps if FLAGS["steps_per_epoch"].present else QUICK_BUDGET[1]
    root = os.path.abspath(FLAGS.output_root)
    domains = list(dict.fromkeys([FLAGS.source_domain, *DEFAULT_SHIFTS, *FLAGS.shifts]))
    return {"recipes": recipes, "shifts": list(FLAGS.shifts), "seeds": seeds,
            "other_seeds": other, "epochs": epochs, "steps_per_epoch": steps, "root": root,
            "domains": domains, "source": FLAGS.source_domain}


def ensure_data(cfg: dict) -> tuple[str, dict]:
    """Generate and prepare the phantom once per set of data parameters; returns (prepared
    directory, data key). A finished step's key is stored under <root>/keys/."""
    root = cfg["root"]
    raw, prepared, keys = (os.path.join(root, d) for d in ("raw", "prepared", "keys"))
    raw_key = {"domains": cfg["domains"], "subjects_per_domain": FLAGS.subjects_per_domain,
               "seed": FLAGS.data_seed}
    data_key = {**raw_key, "layout": "msd", "split": FLAGS.split, "spacing": "2,2,2",
                "size": "96,112"}
    raw_path, prep_path = os.path.join(keys, "data_raw.json"), os.path.join(keys, "data.json")
    if read_json(raw_path) != raw_key or not os.path.isfile(os.path.join(raw, "dataset.json")):
        _step("phantom", ["-m", "uda_tf.cli.phantom", f"--output_dir={raw}",
                          f"--domains={','.join(cfg['domains'])}",
                          f"--subjects_per_domain={FLAGS.subjects_per_domain}",
                          f"--seed={FLAGS.data_seed}"])
        os.makedirs(keys, exist_ok=True)
        write_json_atomic(raw_path, raw_key)
    if read_json(prep_path) != data_key or not os.path.isfile(
            os.path.join(prepared, "manifest.json")):
        _step("prepare", ["-m", "uda_tf.cli.prepare", "--layout=msd", f"--input_dir={raw}",
                          f"--output_dir={prepared}", f"--split={FLAGS.split}",
                          f"--split_seed={FLAGS.data_seed}", "--spacing=2,2,2",
                          "--size=96,112", "--overwrite"])
        write_json_atomic(prep_path, data_key)
    else:
        print(f"=== data: reusing {prepared}", flush=True)
    return prepared, data_key


def plan_runs(cfg: dict) -> list[tuple[int, str, str]]:
    """(seed, shift, recipe) in the order to train: every recipe's first seed on every shift
    before any second seed, so an interrupted benchmark already covers the whole table."""
    per_recipe = {label: seeds_for(label, r, cfg["seeds"], cfg["other_seeds"],
                                   FLAGS.all_seeds_recipes, FLAGS.quick)
                  for label, r in cfg["recipes"].items()}
    order = list(dict.fromkeys(cfg["seeds"] + cfg["other_seeds"]))
    return [(seed, shift, label) for seed in order for shift in cfg["shifts"]
            for label in cfg["recipes"] if seed in per_recipe[label]]


def run_all(cfg: dict, prepared: str, data_key: dict):
    """Every planned run, reused, resumed or trained; returns ({shift: {recipe: {seed:
    record}}}, [failed run names with why])."""
    root = cfg["root"]
    runs_dir, keys = os.path.join(root, "runs"), os.path.join(root, "keys")
    uri = "sqlite:///" + os.path.join(root, "mlflow.db")
    records = {shift: {} for shift in cfg["shifts"]}
    failed = []
    keys_of = {}
    for seed, shift, label in plan_runs(cfg):
        recipe = cfg["recipes"][label]
        name = f"{shift}-{label}-seed{seed}"
        extra = list(FLAGS.train_flag)
        first = f"{shift}-{recipe.after}-seed{seed}" if recipe.after else None
        if first is not None:
            if first not in keys_of:
                failed.append(f"{name} (its first stage {first} did not finish)")
                continue
            extra.append("--init_checkpoint=" + os.path.join(runs_dir, first, "checkpoints",
                                                             "best.weights.h5"))
        args = train_args(recipe, name=name, source=cfg["source"], target=shift, seed=seed,
                          prepared=prepared, runs=runs_dir, tracking_uri=uri,
                          epochs=cfg["epochs"], steps_per_epoch=cfg["steps_per_epoch"],
                          select_on=FLAGS.select_on, extra=extra)
        key = run_key(args, data_key, flagfile_digest(recipe.flagfile))
        if first is not None:  # a retrained first stage makes this a new run too
            key["after"] = keys_of[first]
        path = ensure_run(name, args, key, runs_dir, keys, FLAGS.rerun)
        if path is None:
            failed.append(name)
            continue
        keys_of[name] = key
        try:
            with open(path) as f:
                result = json.load(f)
            curves = read_curves(os.path.dirname(path), result.get("mlflow"))
            record = run_record(result, recipe.role, curves)
        except (OSError, ValueError, KeyError, TypeError) as e:
            failed.append(f"{name} (unreadable result: {e})")
            continue
        records[shift].setdefault(label, {})[seed] = record
    return records, failed


def _branch() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--abbrev-ref", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def build_output(cfg: dict, records: dict, failed: list, errors: list, start: float) -> dict:
    """The JSON document: settings, per-shift summaries, every run's record."""
    summary, cases, tolerance = {}, {}, None
    for shift, runs in records.items():
        try:
            cases[shift] = check_same_test_cases(runs)
        except ValueError as e:
            errors.append(f"{shift}: {e}")
            continue
        if runs:
            summary[shift] = summarise_shift(runs, {k: r for k, r in cfg["recipes"].items()
                                                    if k in runs})
            any_run = next(iter(next(iter(runs.values())).values()))
            tolerance = any_run["target"]["surface_dice_tolerance_mm"]
    return {
        "command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/accuracy.py "
                   + " ".join(sys.argv[1:]),
        "date": f"{_branch()}, {datetime.date.today().isoformat()}".lstrip(", "),
        "source_domain": cfg["source"], "shifts": cfg["shifts"],
        "recipes": {k: dataclasses.asdict(r) for k, r in cfg["recipes"].items()},
        # The seeds used: the first one only with --quick.
        "seeds": cfg["seeds"][:1] if FLAGS.quick else cfg["seeds"],
        "other_seeds": cfg["seeds"][:1] if FLAGS.quick else cfg["other_seeds"],
        "all_seeds_recipes": FLAGS.all_seeds_recipes, "quick": FLAGS.quick,
        "budget": {"epochs": cfg["epochs"], "steps_per_epoch": cfg["steps_per_epoch"]},
        "select_on": FLAGS.select_on, "subjects_per_domain": FLAGS.subjects_per_domain,
        "split": FLAGS.split, "data_seed": FLAGS.data_seed, "train_flags": FLAGS.train_flag,
        "surface_dice_tolerance_mm": tolerance, "test_cases": cases,
        "n_test_cases": max((len(c) for c in cases.values()), default=0),
        "summary": summary, "runs": records, "failed": failed, "errors": errors,
        "wall_seconds": time.time() - start}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.time()
    cfg = parse_config()
    for name in ("json_out", "md_out", "png_out"):
        FLAGS[name].value = os.path.abspath(FLAGS[name].value)
    os.chdir(REPO)  # configs name their nested flagfiles relative to the repository
    prepared, data_key = ensure_data(cfg)
    records, failed = run_all(cfg, prepared, data_key)
    errors = []
    out = build_output(cfg, records, failed, errors, start)
    for path in (FLAGS.json_out, FLAGS.md_out, FLAGS.png_out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(FLAGS.json_out, out)
    markdown = format_markdown(out)
    with atomic_write(FLAGS.md_out) as f:
        f.write(markdown + "\n")
    if out["summary"]:
        plot_results(out, records, FLAGS.png_out)
    print("\n" + markdown)
    print(f"wrote {FLAGS.json_out}, {FLAGS.md_out}"
          f"{', ' + FLAGS.png_out if out['summary'] else ''} ({time.time() - start:.0f} s)")
    if failed or errors:
        sys.exit("accuracy: " + "; ".join([*(f"failed run {n}" for n in failed), *errors]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
