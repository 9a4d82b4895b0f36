"""`python -m uda_tf.cli.tune` (uda-tune): an Optuna study over train.py's flags; the search
space and the pruning callback are in uda_tf/training/tuning.py.

Every trial is a whole training run (train.py's `train`, in this process) named
<study_name>_trial<NNN> under --output_dir, tracked in MLflow as a child of one parent run
of the study. The objective is the trials' own --select_on criterion at the kept epoch
(label-free by default). The study lives in <output_dir>/<study_name>.study/optuna.db: run
the same command again to add trials up to --trials (a trial cut off mid-way is not counted).
The best trial's flags are written to <output_dir>/<study_name>.study/best.cfg.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from uda_tf import files
from uda_tf.cli import entry
from uda_tf.cli import train as train_cli

FLAGS = flags.FLAGS
PARENT_FILE = "mlflow_parent_run_id"


def define_flags():
    train_cli.define_flags()
    flags.DEFINE_multi_string(
        "search", [], "A searched flag, name=kind:arguments; kinds: float:low:high, "
        "logfloat:low:high (log scale), int:low:high, choice:a|b|c. Repeat for each flag, "
        "e.g. --search=learning_rate=logfloat:1e-5:1e-2 --search=grl_lambda=float:0.01:1.")
    flags.DEFINE_integer("trials", 20, "Trials the study should hold when this command ends "
                         "(finished, pruned or failed ones of earlier commands count).",
                         lower_bound=1)
    flags.DEFINE_string("study_name", "tune", "Study name: its folder is "
                        "<output_dir>/<study_name>.study, its trials' runs "
                        "<study_name>_trial<NNN>.")
    flags.DEFINE_enum("pruner", "median", ["median", "none"], "Stop a trial after an epoch "
                      "whose criterion is worse than the median of earlier trials at that "
                      "epoch (Optuna's MedianPruner), or never.")
    flags.DEFINE_integer("pruner_startup_trials", 3, "Trials that always run to the end "
                         "before the pruner stops any.", lower_bound=0)


def _parent_run(uri: str, experiment: str, study_dir: str, study_name: str, terms) -> str | None:
    """The study's MLflow run (created once, reused when the study resumes); None, with a
    warning, when MLflow cannot be reached (the trials then track without a parent)."""
    import mlflow

    from uda_tf.training import tracking
    path = os.path.join(study_dir, PARENT_FILE)
    try:
        client = mlflow.MlflowClient(uri)
        if os.path.isfile(path):
            run_id = open(path).read().strip()
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(tracking.experiment_id_for(uri, experiment), run_name=study_name,
                                tags={"mlflow.note.content": "Optuna study over " + ", ".join(
                                    f"`{t.name}`" for t in terms) + "; each trial is a child "
                                    "run.", "optuna_study": study_name})
        for term in terms:
            client.log_param(run.info.run_id, f"search/{term.name}", term.kind + ":" + (
                "|".join(term.choices) if term.choices else f"{term.low:g}:{term.high:g}"))
    except Exception as e:  # the study goes on without a parent run
        logging.warning("MLflow (%s) failed: %s; trials are tracked without a parent run",
                        uri, e)
        return None
    with files.atomic_write(path) as f:
        f.write(run.info.run_id + "\n")
    return run.info.run_id


def _finish_parent(uri: str, run_id: str | None, study, status: str) -> None:
    if run_id is None:
        return
    import mlflow
    try:
        client = mlflow.MlflowClient(uri)
        states = [t.state.name for t in study.trials]
        for state in ("COMPLETE", "PRUNED", "FAIL"):
            client.log_metric(run_id, f"trials_{state.lower()}", states.count(state))
        if any(t.state.name == "COMPLETE" for t in study.trials):
            client.log_metric(run_id, "best_value", study.best_value)
            client.set_tag(run_id, "best_trial", str(study.best_trial.number))
        client.set_terminated(run_id, status)
    except Exception as e:
        logging.warning("MLflow (%s) failed at the end of the study: %s", uri, e)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import optuna

    from uda_tf.training import tracking, tuning
    from uda_tf.training.config import RunConfig
    from uda_tf.training.selection import selection_monitor
    base = train_cli.resolved_flags()
    known = {name: FLAGS[name].parser.parse for name in train_cli._NAMES}
    try:
        terms = tuning.parse_space(FLAGS.search, known)
        files.check_name(FLAGS.study_name, "--study_name", what="study name")
        base_cfg = RunConfig.from_flags(base)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    monitor, mode = selection_monitor(base_cfg.select_on)
    study_dir = os.path.abspath(os.path.join(base_cfg.output_dir, f"{FLAGS.study_name}.study"))
    os.makedirs(study_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=FLAGS.pruner_startup_trials)
              if FLAGS.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(
        study_name=FLAGS.study_name, storage=f"sqlite:///{study_dir}/optuna.db",
        direction="maximize" if mode == "max" else "minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base_cfg.seed), pruner=pruner)
    uri = base_cfg.mlflow_tracking_uri or tracking.default_tracking_uri(base_cfg.output_dir)
    experiment = tracking.experiment_name(base_cfg.mlflow_experiment, sys.argv)
    parent = _parent_run(uri, experiment, study_dir, FLAGS.study_name, terms)
    finished = sum(t.state.is_finished() for t in study.trials)
    print(f"study {FLAGS.study_name} ({study_dir}): {finished} trial(s) finished, "
          f"{max(0, FLAGS.trials - finished)} to run; objective {monitor} ({mode})")
    status = "FAILED"
    try:
        for _ in range(max(0, FLAGS.trials - finished)):
            _run_trial(study, terms, base, known, monitor, parent)
        status = "FINISHED"
    finally:
        _finish_parent(uri, parent, study, status)
    _report(study, base, known, study_dir)


def _run_trial(study, terms, base, known, monitor, parent) -> None:
    import keras
    import optuna

    from uda_tf.training import tuning
    from uda_tf.training.config import RunConfig
    trial = study.ask()
    params = {t.name: t.suggest(trial) for t in terms}
    values = {**_trial_values(base, known, params),
              "run_name": f"{FLAGS.study_name}_trial{trial.number:03d}"}
    report = tuning.ReportToTrial(trial, monitor)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in params.items())
    try:
        result = train_cli.train(RunConfig.from_flags(values), callbacks=[report], tags={
            **({"mlflow.parentRunId": parent} if parent else {}),
            "optuna_study": FLAGS.study_name, "optuna_trial": str(trial.number)})
    except Exception as e:  # a failed trial is recorded as one; the study goes on
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number}: {shown}: FAILED ({type(e).__name__}: {e})")
        logging.warning("trial %d failed", trial.number, exc_info=True)
        return
    finally:
        keras.backend.clear_session()
    value = result["selection"]["best"]
    if report.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"trial {trial.number}: {shown}: pruned after epoch {report.last_epoch} "
              f"({monitor} {value:.4f})")
    else:
        study.tell(trial, value)
        print(f"trial {trial.number}: {shown}: {monitor} {value:.4f}")


def _trial_values(base: dict, known: dict, params: dict) -> dict:
    """train.py's flag values of a trial: `base` with the trial's `params`, a choice (a
    string) parsed by its flag's parser."""
    return {**base, **{k: known[k](v) if isinstance(v, str) else v for k, v in params.items()}}


def _report(study, base, known, study_dir) -> None:
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        sys.exit("tune: error: no trial finished; see the warnings above")
    best = study.best_trial
    path = os.path.join(study_dir, "best.cfg")
    with files.atomic_write(path) as f:
        f.write(train_cli.flagfile_text(
            {**_trial_values(base, known, best.params), "run_name": None},
            f"best trial {best.number} of study {study.study_name} ({best.value:.4f}); "
            f"python train.py --flagfile={path} --run_name=<name>"))
    print(f"best trial {best.number}: {best.value:.4f} with " + ", ".join(
        f"{k}={v}" for k, v in best.params.items()) + f"\nbest flags: {path}")


ABOUT = """Search train.py's hyper-parameters with Optuna: every trial is a whole training run
(tracked in MLflow as a child of the study's run); the objective is the trials' --select_on
criterion at the kept epoch (source validation Dice by default: no target label); the median
pruner stops poor trials after an epoch. Run the same command again to resume the study. All
of train.py's flags apply to every trial (--flagfile included).

example: python -m uda_tf.cli.tune --flagfile=demo_out/train.cfg --method=grl \\
           --search=learning_rate=logfloat:1e-4:1e-2 --search=grl_lambda=float:0.01:1 \\
           --trials=20"""

def _sections():
    """--help's groups: train.py's, then the study's own flags."""
    return [*train_cli.train_sections(), ("study", "search")]


def run():
    entry.run(main, define_flags, ABOUT, sections=_sections)


if __name__ == "__main__":
    sys.exit(run())
