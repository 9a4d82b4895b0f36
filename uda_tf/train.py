"""Train a segmentor with a domain adaptation method, track it in MLflow, export and evaluate.

    python train.py --flagfile=configs/demo.cfg [--method=grl ...]

Steps: read the prepared dataset's manifest; stream source (image, label) and target (image)
batches; fit the method's keras.Model under a tf.distribute strategy, keeping the segmentor
with the best source-validation Dice; export it as a SavedModel; evaluate the SavedModel on
the source and target test splits (target numbers are reported as "oracle" and never used to
choose anything); log everything to MLflow and write <run_dir>/result.json.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from types import SimpleNamespace

from absl import app, flags, logging

from uda_tf.methods import METHODS
from uda_tf.models.layers import NORMALIZATIONS
from uda_tf.training.schedules import LAMBDA_SCHEDULES

FLAGS = flags.FLAGS
_NAMES: list[str] = []  # the flags this CLI defines, in order: resolved, logged and saved


def _define(kind, name, default, help_text, enum_values=None, **kwargs):
    if kind == "enum":
        flags.DEFINE_enum(name, default, enum_values, help_text, **kwargs)
    else:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, **kwargs)
    _NAMES.append(name)


def define_flags():
    """Define this CLI's flags (at run time, so importing the module defines nothing)."""
    # data
    _define("string", "data_dir", None, "Prepared dataset: a directory with manifest.json "
            "(python -m uda_tf.prepare).")
    _define("string", "dataset_source", "", "Where the raw dataset comes from and how to prepare "
            "it; printed when --data_dir holds no prepared dataset.")
    _define("string", "source_domain", None, "Labelled source domain (a domain in the manifest).")
    _define("string", "target_domain", None, "Unlabelled target domain; its labels are never read "
            "for training or checkpoint choice.")
    _define("integer", "shuffle_buffer", 2048, "Slices in each domain's shuffle buffer.", lower_bound=1)
    _define("bool", "augment", True, "Flip and intensity-jitter training batches.")
    # method and model
    _define("enum", "method", "source_only", "Adaptation method.", enum_values=sorted(METHODS))
    _define("integer", "base_filters", 16, "Filters of the first U-Net block (doubles per block).",
            lower_bound=1)
    _define("enum", "norm", "instance", "Normalisation layers.", enum_values=list(NORMALIZATIONS))
    _define("float", "dice_weight", 1.0, "Weight of the soft Dice term in Dice + CE.", lower_bound=0)
    _define("float", "grl_lambda", 1.0, "GRL: maximum gradient-reversal factor lambda.", lower_bound=0)
    _define("enum", "lambda_schedule", "dann", "GRL: lambda over training: the DANN ramp "
            "2/(1+exp(-10p))-1 or constant.", enum_values=list(LAMBDA_SCHEDULES))
    _define("enum", "grl_features", "bottleneck", "GRL: features the domain classifier sees: "
            "the bottleneck, or every encoder level (skip connections) and the bottleneck.",
            enum_values=["bottleneck", "encoder"])
    _define("float", "domain_loss_weight", 1.0, "GRL: weight beta of the domain loss.", lower_bound=0)
    # optimisation
    _define("integer", "epochs", 10, "Epochs.", lower_bound=1)
    _define("integer", "steps_per_epoch", 100, "Training steps per epoch.", lower_bound=1)
    _define("integer", "global_batch_size", 16, "Source slices per step over all replicas (the same "
            "number of target slices is added for methods that use target data).", lower_bound=1)
    _define("float", "learning_rate", 1e-3, "Adam learning rate of the segmentor.", lower_bound=0)
    _define("float", "disc_learning_rate", 1e-3, "Adam learning rate of the domain classifier.",
            lower_bound=0)
    _define("integer", "seed", 0, "Random seed (weights, shuffling, augmentation).")
    _define("bool", "jit_compile", False, "Compile train/test steps with XLA.")
    # devices
    _define("integer", "num_cpu_devices", 1, "On a machine without GPUs, split the CPU into this "
            "many logical devices and mirror over them (used by tests).", lower_bound=1)
    # outputs
    _define("string", "output_dir", "runs", "Root of the run directories.")
    _define("string", "run_name", "", "Run directory and MLflow run name (default: "
            "<method>-<timestamp>).")
    _define("bool", "overwrite", False, "Replace an existing run directory of the same name.")
    _define("string", "model_name", "uda_segmentor", "SavedModel name: exported to "
            "<run_dir>/export/<model_name>/<version>.")
    _define("string", "mlflow_tracking_uri", "", "MLflow tracking URI (default: sqlite store "
            "<output_dir>/mlflow.db).")
    _define("string", "mlflow_experiment", "", "MLflow experiment name (default: the "
            "--flagfile's basename without .cfg, one experiment per config; else uda_tf).")
    _define("bool", "resume", False, "Continue in the existing run directory --run_name "
            "(not wiped) and its MLflow run (<run_dir>/mlflow_run_id).")
    _define("string", "register_model_name", "", "Register the exported model in the MLflow "
            "Model Registry under this name (empty: do not register).")
    _define("string", "register_alias", "", "Alias (e.g. champion) for the registered version; "
            "needs --register_model_name.")
    _define("integer", "mlflow_sample_slices", 4, "Target validation slices in the logged "
            "sample-segmentation figure (0: none).", lower_bound=0)
    # reliability (uda_tf/training/resume.py, guards.py)
    _define("bool", "deterministic", False, "Op determinism and seeded data: a run resumed "
            "from a backup ends with the same weights as an uninterrupted one (slower).")
    _define("integer", "backup_every_steps", 100, "Back up the whole training state (weights, "
            "every optimizer, schedules, epoch, step) to <run_dir>/backup every this many steps "
            "and at every epoch end (0: epoch ends only); --resume continues from it.",
            lower_bound=0)
    _define("enum", "on_divergence", "stop", "A non-finite loss term or gradient norm: stop "
            "naming it, or roll back to the last backup and skip the batches since.",
            enum_values=["stop", "rollback"])
    _define("bool", "check_shards", True, "Check the sha256 of every shard used against the "
            "manifest before training (a corrupted shard is named, not met mid-epoch).")
    _define("integer", "max_rollbacks", 3, "--on_divergence=rollback: stop after this many.",
            lower_bound=0)
    flags.register_multi_flags_validator(
        ["resume", "run_name"], lambda v: not v["resume"] or bool(v["run_name"]),
        message="--resume needs --run_name: the run directory to continue")
    flags.register_multi_flags_validator(
        ["register_alias", "register_model_name"],
        lambda v: not v["register_alias"] or bool(v["register_model_name"]),
        message="--register_alias needs --register_model_name")



def resolved_flags() -> dict:
    return {name: FLAGS[name].value for name in _NAMES}


def flagfile_text(values: dict) -> str:
    lines = ["# resolved flags of this run; rerun with python train.py --flagfile=<this file>"]
    for name, value in values.items():
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        elif value is not None:
            lines.append(f"--{name}={value}")
    return "\n".join(lines) + "\n"


def require_prepared_data(data_dir, dataset_source):
    """The manifest, or an exit message saying what is missing and how to get it."""
    from uda_tf.data.manifest import load_manifest
    if not data_dir:
        raise app.UsageError("--data_dir is required: a directory written by "
                             "python -m uda_tf.prepare")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        hint = f"\nDataset: {dataset_source}" if dataset_source else ""
        raise app.UsageError(
            f"--data_dir={data_dir}: no prepared dataset there (manifest.json missing).{hint}\n"
            "Prepare it with python -m uda_tf.prepare --output_dir=<dir> and point --data_dir "
            "at <dir>.")
    return load_manifest(data_dir)


def check_domains(manifest, source, target, method_cls):
    domains = sorted(manifest["domains"])
    if source not in manifest["domains"]:
        raise app.UsageError(f"--source_domain={source!r} is not in the dataset; domains: {domains}")
    if not manifest["domains"][source].get("labelled", True):
        raise app.UsageError(f"--source_domain={source!r} has no labels; the source must be "
                             "labelled")
    if target is not None and target not in manifest["domains"]:
        raise app.UsageError(f"--target_domain={target!r} is not in the dataset; domains: {domains}")
    if method_cls.uses_target and target is None:
        raise app.UsageError("--target_domain is required by this --method")
    if target == source:
        raise app.UsageError("--target_domain must differ from --source_domain")


def make_run_dir(cfg) -> str:
    name = cfg.run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.output_dir, name)
    if os.path.exists(run_dir) and os.listdir(run_dir):
        if not cfg.overwrite:
            raise app.UsageError(f"run directory {run_dir} exists; pick another --run_name or "
                                 "pass --overwrite")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    cfg.run_name = name
    return run_dir


def train(cfg: SimpleNamespace) -> dict:
    """Everything after flag parsing; `cfg` holds resolved flag values. Returns result.json."""
    import keras

    from uda_tf.data import pipeline
    from uda_tf.evaluate import evaluate_model
    from uda_tf.export import export_segmentor, load_serving_fn
    from uda_tf.methods import get_method
    from uda_tf.models import segmentor_from_flags
    from uda_tf.training import devices, figures, guards, resume, tracking
    from uda_tf.training.callbacks import BestSegmentorCheckpoint

    method_cls = get_method(cfg.method)
    manifest = require_prepared_data(cfg.data_dir, cfg.dataset_source)
    check_domains(manifest, cfg.source_domain, cfg.target_domain, method_cls)
    guards.check_writable(cfg.output_dir, "--output_dir")  # before any work, not at the end
    if cfg.check_shards:
        from uda_tf.data.integrity import verify_shards
        verify_shards(manifest, cfg.data_dir, {cfg.source_domain, cfg.target_domain})
    strategy = devices.make_strategy(cfg.num_cpu_devices)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    if cfg.resume:  # continue the crashed run: same directory (kept) and MLflow run
        run_dir = os.path.join(cfg.output_dir, cfg.run_name)
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = make_run_dir(cfg)
    cfg.mlflow_experiment = tracking.experiment_name(cfg.mlflow_experiment, sys.argv)
    values = dict(vars(cfg))
    flags_path = os.path.join(run_dir, "flags.cfg")
    with open(flags_path, "w") as f:
        f.write(flagfile_text(values))

    label_names = {int(k): v for k, v in manifest["label_names"].items()}
    class_names = [label_names[i] for i in range(manifest["num_classes"])]

    def make_segmentor(sync_batchnorm=False):
        return segmentor_from_flags(vars(cfg), manifest, sync_batchnorm=sync_batchnorm)

    def train_ds_after(batches):
        """The training stream after `batches` batches (resume.py): replayed and skipped
        under --deterministic, else re-seeded with the position."""
        ds = pipeline.train_dataset(
            cfg.data_dir, manifest, source=cfg.source_domain,
            target=cfg.target_domain if method_cls.uses_target else None,
            global_batch_size=cfg.global_batch_size, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed if cfg.deterministic else cfg.seed + batches,
            augment_data=cfg.augment)
        return ds.skip(batches) if cfg.deterministic else ds
    # Validation repeats with a step count of exactly one pass, so every epoch sees every
    # source-validation slice once (and Keras does not hit the end of a finite dataset).
    val_ds = pipeline.eval_dataset(cfg.data_dir, manifest, cfg.source_domain, "val",
                                   batch_size=cfg.global_batch_size).repeat()
    val_steps = math.ceil(pipeline.num_records(manifest, cfg.source_domain, "val")
                          / cfg.global_batch_size)
    if val_steps == 0:
        raise app.UsageError(f"--source_domain={cfg.source_domain!r} has no validation slices; "
                             "checkpoints are chosen on source validation Dice")
    with strategy.scope():
        model = method_cls.from_flags(
            make_segmentor(sync_batchnorm=strategy.num_replicas_in_sync > 1), class_names, cfg)
        model.compile_from_flags(cfg)
        model.build_optimizers()
        grad_norms = guards.track_gradient_norms(model)

    tracking_uri = cfg.mlflow_tracking_uri or tracking.default_tracking_uri(cfg.output_dir)
    tags = {"git_commit": tracking.git_commit(os.path.dirname(os.path.abspath(__file__))),
            "dataset_content_hash": manifest.get("content_hash"), "method": cfg.method,
            **tracking.environment_tags(strategy)}
    tracking.set_http_defaults()
    tracker = tracking.RunTracker(tracking_uri, run_dir, cfg.mlflow_experiment, cfg.run_name,
                                  resume=cfg.resume)
    tracker.log_params(values)
    tracker.set_tags(tags)
    tracker.log_artifact(flags_path)
    tracker.log_artifact(os.path.join(cfg.data_dir, "manifest.json"))
    tracker.flush()  # a failure is kept and retried at the next epoch; training goes on
    epoch_logger = tracking.MlflowEpochLogger(tracker)
    status = "FAILED"
    try:
        ckpt_path = os.path.join(run_dir, "checkpoints", "best.weights.h5")
        checkpoint = BestSegmentorCheckpoint(ckpt_path, monitor="val_dice", mode="max")
        os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
        shutil.copy(flags_path, os.path.join(os.path.dirname(ckpt_path), "flags.cfg"))
        # The checkpoint directory is self-contained for `uda-export` (weights, flags, data).
        shutil.copy(os.path.join(cfg.data_dir, "manifest.json"),
                    os.path.join(os.path.dirname(ckpt_path), "manifest.json"))
        backup = resume.TrainingBackup(
            os.path.join(run_dir, resume.BACKUP_DIR), steps_per_epoch=cfg.steps_per_epoch,
            every_steps=cfg.backup_every_steps, flags=values)
        guard = guards.DivergenceGuard(grad_norms, policy=cfg.on_divergence, backup=backup,
                                       max_rollbacks=cfg.max_rollbacks)
        backup.stateful.update(checkpoint=checkpoint, epoch_logger=epoch_logger, guard=guard)
        start = time.time()
        # Order matters: the guard checks a step before it is backed up and adds gradient
        # norms to the epoch logs before they are logged; the backup saves last.
        resume.fit_from_backup(
            model, train_ds_after, backup, epochs=cfg.epochs,
            steps_per_epoch=cfg.steps_per_epoch, validation_data=val_ds,
            validation_steps=val_steps, shuffle=False, verbose=2,
            callbacks=[guard, checkpoint, epoch_logger, backup])
        train_seconds = time.time() - start

        # Export the best segmentor, rebuilt outside the strategy so the SavedModel holds
        # plain variables, then evaluate what was exported.
        segmentor = make_segmentor()
        segmentor.load_weights(ckpt_path)
        export_path = export_segmentor(segmentor, os.path.join(run_dir, "export"),
                                       cfg.model_name, manifest=manifest)
        serve = load_serving_fn(export_path)
        predict = lambda images: serve(image=images)["labels"]  # noqa: E731
        evaluations = {}
        for role, domain in (("source", cfg.source_domain), ("target", cfg.target_domain)):
            if domain is None or not manifest["domains"][domain]["cases"].get("test"):
                continue
            oracle = role == "target"
            out = os.path.join(run_dir, "eval", f"{role}_test")
            summary = evaluate_model(predict, cfg.data_dir, manifest, domain, "test", out,
                                     oracle=oracle)
            prefix = f"{'oracle/' if oracle else ''}{role}_test"
            metrics = {f"{prefix}/dice_{c}": s["dice"]["mean"]
                       for c, s in summary["classes"].items()}
            metrics[f"{prefix}/dice_mean"] = summary["foreground"]["dice"]["mean"]
            tracker.log_metrics(metrics, flush=False)
            tracker.log_artifact(out, artifact_path=f"eval/{role}_test")
            evaluations[role] = {"domain": domain, "dir": out, "summary": summary}
        # Learning curves, sample target slices with entropy (no target labels read), model.
        for path in figures.learning_curves(epoch_logger.history, os.path.join(run_dir, "plots")):
            tracker.log_artifact(path, artifact_path="plots")
        sample = figures.sample_segmentations(
            serve, cfg.data_dir, manifest, cfg.target_domain or cfg.source_domain,
            os.path.join(run_dir, "samples", "segmentations.png"), count=cfg.mlflow_sample_slices)
        if sample:
            tracker.log_artifact(sample, artifact_path="samples")
        tracker.log_saved_model(export_path, register_name=cfg.register_model_name,
                                alias=cfg.register_alias)
        tracker.log_metrics({"best_val_dice": checkpoint.best,
                             "train_seconds": train_seconds})  # sends all of the above
        result = {"run_dir": run_dir, "run_name": cfg.run_name, "method": cfg.method,
                  "mlflow": {"tracking_uri": tracking_uri, "run_id": tracker.run_id,
                             "experiment": cfg.mlflow_experiment,
                             "model": tracker.model_info,
                             "ui": tracking.ui_command(tracking_uri)},
                  "best_epoch": checkpoint.best_epoch, "best_val_dice": checkpoint.best,
                  "checkpoint": ckpt_path, "saved_model": export_path,
                  "train_seconds": train_seconds, "evaluations": evaluations}
        with open(os.path.join(run_dir, "result.json.tmp"), "w") as f:
            json.dump(result, f, indent=2)
        os.replace(os.path.join(run_dir, "result.json.tmp"), os.path.join(run_dir, "result.json"))
        status = "FINISHED"
        return result
    finally:
        tracker.finish(status)  # flushes; if MLflow is unreachable: <run_dir>/mlflow_unsent.json


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TF's SavedModel writer logs every file at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from uda_tf.training.guards import DivergenceError
    from uda_tf.data.integrity import ShardCorruptedError
    from uda_tf.training.resume import BackupError
    try:
        result = train(SimpleNamespace(**resolved_flags()))
    except (DivergenceError, BackupError, OSError, ShardCorruptedError) as e:
        sys.exit(f"train: error: {e}")
    print(f"run directory: {result['run_dir']}")
    for role, ev in result["evaluations"].items():
        fg = ev["summary"]["foreground"]["dice"]
        tag = " (oracle: target labels, not used for selection)" if role == "target" else ""
        print(f"{role} test Dice ({ev['domain']}): {fg['mean']:.4f} ± {fg['std']:.4f}{tag}")
    print(f"SavedModel: {result['saved_model']}")
    print(f"MLflow: {result['mlflow']['ui']}")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
