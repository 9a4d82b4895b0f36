"""Hyper-parameter search with Optuna (Akiba et al., KDD 2019): the search space a user
writes on the command line, and the Keras callback that reports each epoch to the trial.

A search term is `name=kind:arguments`, one per --search:

    learning_rate=logfloat:1e-5:1e-2     float on a log scale
    grl_lambda=float:0.01:1              float, uniform
    base_filters=int:8:32                integer
    norm=choice:batch|instance           one of the listed values (parsed like the flag)

The objective is the run's own model-selection criterion (--select_on: source validation
Dice by default, a label-free target criterion, or the oracle only when asked), read at the
kept epoch; each epoch's value goes to the pruner, which may stop a trial early.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import keras

KINDS = ("float", "logfloat", "int", "choice")
# Flags a search may not vary: they name the trial's place, not how it trains.
FIXED = frozenset({"run_name", "output_dir", "data_dir", "resume", "overwrite",
                   "mlflow_tracking_uri", "mlflow_experiment", "select_on"})


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def suggest(self, trial):
        """This term's value for an Optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "logfloat")


def parse_term(text: str, known: dict[str, Callable]) -> Term:
    """`name=kind:arguments` (module docstring); `known` maps each flag that may be searched
    to the function parsing one of its values (choices are checked with it). A ValueError
    names the term and what was expected."""
    where = f"--search={text}"
    name, sep, spec = text.partition("=")
    kind, _, args = spec.partition(":")
    if not sep or not name or kind not in KINDS:
        raise ValueError(f"{where}: expected name=kind:arguments with kind one of "
                         f"{', '.join(KINDS)} (e.g. learning_rate=logfloat:1e-5:1e-2)")
    if name in FIXED:
        raise ValueError(f"{where}: --{name} names where a trial runs; it cannot be searched")
    if name not in known:
        raise ValueError(f"{where}: train.py has no flag --{name}")
    if kind == "choice":
        choices = tuple(args.split("|")) if args else ()
        if len(choices) < 2:
            raise ValueError(f"{where}: choice needs two values or more, a|b")
        for choice in choices:
            try:
                known[name](choice)
            except Exception as e:  # the flag's own parser says what is wrong
                raise ValueError(f"{where}: {choice!r} is not a value of --{name}: {e}") \
                    from None
        return Term(name, kind, choices=choices)
    parts = args.split(":")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{where}: {kind} needs low:high numbers") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{where}: needs finite low < high, got {low:g}:{high:g}")
    if kind == "logfloat" and low <= 0:
        raise ValueError(f"{where}: logfloat needs low > 0")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ValueError(f"{where}: int needs whole numbers")
    return Term(name, kind, low, high)


def parse_space(texts, known: dict[str, Callable]) -> list[Term]:
    terms = [parse_term(t, known) for t in texts]
    names = [t.name for t in terms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--search names --{repeated[0]} twice")
    if not terms:
        raise ValueError("--search: give at least one term, e.g. "
                         "--search=learning_rate=logfloat:1e-5:1e-2")
    return terms


class ReportToTrial(keras.callbacks.Callback):
    """Reports the epoch's `monitor` to the Optuna trial; when the pruner says so, the run
    stops after this epoch (as early stopping does: it still exports and evaluates what it
    kept) and `pruned` is set."""

    def __init__(self, trial, monitor: str):
        super().__init__()
        self.trial, self.monitor = trial, monitor
        self.pruned = False
        self.last_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned = True
            self.model.stop_training = True
