"""Train a segmentor with a domain adaptation method, track it in MLflow, export and evaluate.

    python train.py --flagfile=uda:demo --data_dir=demo_out/prepared [--method=grl ...]

Steps: read the prepared dataset's manifest; stream source (image, label) and target (image)
batches; fit the method's keras.Model under a tf.distribute strategy, keeping the segmentor
with the best source-validation Dice; export it as a SavedModel; evaluate the SavedModel on
the source and target test splits (target numbers are reported as "oracle" and never used to
choose anything); log everything to MLflow and write <run_dir>/result.json.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time

from absl import app, flags, logging

from uda_tf import files, methods
from uda_tf.cli import entry
from uda_tf.methods import METHODS, settings
from uda_tf.training import adapt, config, devices, guards, multiworker
from uda_tf.training.config import CONFIG_FILE, RunConfig

FLAGS = flags.FLAGS
_NAMES: list[str] = []  # the flags this CLI defines, in order: resolved, logged and saved


def _define(kind, name, default, help_text, enum_values=None, **kwargs):
    if name in _NAMES:
        return
    if kind == "enum":
        flags.DEFINE_enum(name, default, enum_values, help_text, **kwargs)
    else:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, **kwargs)
    _NAMES.append(name)


def define_flags():
    """Define this CLI's flags (at run time, so importing the module defines nothing); once
    per process (tests define them to read their defaults). They are generated from
    `RunConfig`'s fields, with every registered method's settings after --head. Called again,
    it adds the flags and the --method value of methods registered since (a method module
    imported later)."""
    if _NAMES:
        methods.define_flags(_define)
        known = FLAGS["method"].parser.enum_values
        known.extend(sorted(set(METHODS) - set(known)))
        return
    run_names = [f.name for f in settings.fields(RunConfig)]
    cut = run_names.index(config.METHOD_SETTINGS_AFTER) + 1
    settings.define_flags([RunConfig], _define, names=run_names[:cut])
    methods.define_flags(_define)  # every registered method's settings (each one's Config)
    settings.define_flags([RunConfig], _define, names=run_names[cut:])
    for f in settings.fields(RunConfig):  # the checks RunConfig runs, as absl validators
        if f.metadata["check"] is not None:
            flags.register_validator(f.name, functools.partial(_validate, f.metadata["check"],
                                                               f.name))
    for names, passes, message in config.CROSS_FIELD_RULES:
        flags.register_multi_flags_validator(list(names), passes, message=message)


def _validate(check, name, value) -> bool:
    try:
        check(name, value)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def resolved_flags() -> dict:
    return {name: FLAGS[name].value for name in _NAMES}


def flagfile_text(values: dict, title: str = "resolved flags of this run; rerun with "
                  "python train.py --flagfile=<this file>") -> str:
    """`values` {flag: value} as a flagfile train.py reads (None values left out), under a
    `# title` line."""
    lines = [f"# {title}"]
    for name, value in values.items():
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, (list, tuple)):  # list flags: comma form, as on the command line
            lines.append(f"--{name}={','.join(_item_text(v) for v in value)}")
        elif value is not None:
            lines.append(f"--{name}={value}")
    return "\n".join(lines) + "\n"


def _item_text(value) -> str:
    """A list item as a user types it: a typed whole float (class weight 1.0) as 1."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def require_prepared_data(data_dir, dataset_source):
    """The manifest, or an exit message saying what is missing and how to get it."""
    from uda_tf.data.manifest import load_manifest
    if not data_dir:
        raise app.UsageError("--data_dir is required: a directory written by "
                             "python -m uda_tf.cli.prepare")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        hint = f"\nDataset: {dataset_source}" if dataset_source else ""
        raise app.UsageError(
            f"--data_dir={data_dir}: no prepared dataset there (manifest.json missing).{hint}\n"
            "Prepare it with python -m uda_tf.cli.prepare --output_dir=<dir> and point --data_dir "
            "at <dir>.")
    try:
        return load_manifest(data_dir)
    except ValueError as e:  # unreadable, not a manifest, another version, edited by hand
        raise app.UsageError(f"--data_dir={data_dir}: {e}") from None


def check_domains(manifest, source, target, method_cls):
    domains = sorted(manifest.domains)
    if source not in manifest.domains:
        raise app.UsageError(f"--source_domain={source!r} is not in the dataset; domains: {domains}")
    if not manifest.is_labelled(source):
        raise app.UsageError(f"--source_domain={source!r} has no labels; the source must be "
                             "labelled")
    if target is not None and target not in manifest.domains:
        raise app.UsageError(f"--target_domain={target!r} is not in the dataset; domains: {domains}")
    if method_cls.uses_target and target is None:
        raise app.UsageError("--target_domain is required by this --method")
    if target == source:
        raise app.UsageError("--target_domain must differ from --source_domain")


def labelled_per_batch(cfg) -> int:
    """Semi-supervised: labelled target samples per batch (default a quarter, at least 1)."""
    return cfg.target_labelled_per_batch or max(1, cfg.global_batch_size // 4)


def labelled_target_cases(cfg, manifest) -> list[str]:
    """Semi-supervised: the target cases --target_labelled_cases names (checked at start-up)."""
    from uda_tf.data import semi_supervised
    if not cfg.target_labelled_cases:
        return []
    if cfg.target_domain is None:
        raise app.UsageError("--target_labelled_cases needs --target_domain")
    per_batch = labelled_per_batch(cfg)
    if per_batch >= cfg.global_batch_size:
        raise app.UsageError(f"--target_labelled_per_batch={per_batch} must be smaller than "
                             f"--global_batch_size={cfg.global_batch_size}")
    try:
        cases = semi_supervised.resolve_cases(manifest, cfg.target_domain,
                                              cfg.target_labelled_cases)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    logging.warning("semi-supervised: labels of target cases %s enter training", cases)
    return cases


def check_adaptation_flags(cfg):
    if cfg.adabn and cfg.target_domain is None:
        raise app.UsageError("--adabn needs --target_domain: the images whose BatchNorm "
                             "statistics replace the source ones")
    if cfg.adabn and cfg.norm != "batch":
        raise app.UsageError(f"--adabn re-estimates BatchNorm statistics; --norm={cfg.norm} has "
                             "none: use --norm=batch")


def check_selection(manifest, cfg):
    """--select_on needs what it reads: target validation images, and labels for oracle."""
    if cfg.select_on == "source_dice":
        return
    if cfg.target_domain is None or not manifest.cases(cfg.target_domain, "val"):
        raise app.UsageError(f"--select_on={cfg.select_on} needs --target_domain with a "
                             "validation split (the target domain has no val cases)")
    if cfg.select_on == "oracle" and not manifest.labelled_cases(cfg.target_domain, "val"):
        raise app.UsageError(f"--select_on=oracle needs target validation labels; domain "
                             f"{cfg.target_domain!r} has no labelled val case")


def check_names(cfg) -> None:
    """Names that become paths (the run directory under --output_dir, the export under the
    run) or MLflow registry names must be plain names: `--run_name=../x --overwrite` would
    otherwise remove a directory anywhere. Checked before anything is created."""
    if cfg.run_name:
        files.check_name(cfg.run_name, "--run_name")
    files.check_name(cfg.model_name, "--model_name", what="model name")
    if cfg.register_model_name:
        # MLflow's registry refuses '/' and ':' too, but only when it registers, after training.
        files.check_name(cfg.register_model_name, "--register_model_name", what="model name")
        if ":" in cfg.register_model_name:
            raise files.BadNameError(f"--register_model_name={cfg.register_model_name!r} must "
                                     "not contain ':' (MLflow model registry names)")
    if cfg.register_alias:
        try:
            from mlflow.utils.validation import (_validate_model_alias_name,
                                                 _validate_model_alias_name_reserved)
        except ImportError:  # a private helper of MLflow: the registry still checks at the end
            return
        from mlflow.exceptions import MlflowException
        try:
            _validate_model_alias_name(cfg.register_alias)
            _validate_model_alias_name_reserved(cfg.register_alias)
        except MlflowException as e:
            raise files.BadNameError(f"--register_alias={cfg.register_alias!r}: {e.message}") \
                from None


def check_splits(manifest, cfg, method_cls) -> None:
    """The splits training reads exist: source train and val (checkpoints are chosen on
    source validation Dice), and target train images when the method or AdaBN reads them.
    Checked at start-up, before a run directory or an MLflow run exists."""

    def splits(domain):
        have = manifest.splits(domain)
        return ", ".join(f"{s} ({manifest.num_records(domain, s)} records)"
                         for s in have) or "none"

    source = cfg.source_domain
    if not manifest.num_records(source, "train"):
        raise app.UsageError(f"--source_domain={source!r} has no train records to train on; "
                             f"its splits: {splits(source)}")
    if not manifest.num_records(source, "val"):
        raise app.UsageError(f"--source_domain={source!r} has no validation records; "
                             "checkpoints are chosen on source validation Dice; its splits: "
                             f"{splits(source)}")
    target = cfg.target_domain
    needs = [why for why, on in ((f"--method={cfg.method}", method_cls.uses_target),
                                 ("--adabn", cfg.adabn)) if on]
    if target is not None and needs and not manifest.num_records(target, "train"):
        raise app.UsageError(f"--target_domain={target!r} has no train images, which "
                             f"{' and '.join(needs)} read; its splits: {splits(target)}")


def plan_run_dir(cfg) -> tuple[str, str]:
    """The run directory and the run's name (--run_name, or <method>-<time>), checked without
    writing anything: inside --output_dir; with --resume an earlier run of ours; otherwise new,
    empty, or (with --overwrite) one uda_tf created. `claim_run_dir` acts on it once every
    other check has passed."""
    from uda_tf.training import resume, tracking
    name = cfg.run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    files.check_name(name, "--run_name")
    run_dir = os.path.join(cfg.output_dir, name)
    files.inside(cfg.output_dir, run_dir, "--run_name")  # e.g. a link to somewhere else
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise app.UsageError(f"--run_name={name}: {run_dir} exists and is not a directory")
    exists = os.path.isdir(run_dir)
    if cfg.resume:
        if not exists:
            raise app.UsageError(f"--resume: there is nothing to resume: the run directory "
                                 f"{run_dir} does not exist (start the run without --resume)")
        has_backup = bool(resume.list_backups(os.path.join(run_dir, resume.BACKUP_DIR)))
        has_run_id = os.path.isfile(os.path.join(run_dir, tracking.RUN_ID_FILE))
        if not (has_backup or has_run_id or files.created_by_us(run_dir)):
            raise app.UsageError(
                f"--resume: there is nothing to resume in {run_dir}: no training backup "
                f"({resume.BACKUP_DIR}/step-*), no {tracking.RUN_ID_FILE} and no "
                f"{files.MARKER_FILE}; it "
                "is not a run of uda_tf")
        if not has_backup:
            # Ours (marker or MLflow run id), stopped before its first backup: nothing was
            # trained yet, so starting from scratch in it loses nothing.
            logging.warning("--resume: %s has no training backup yet (the run stopped before "
                            "its first one); training starts from scratch in it", run_dir)
        return run_dir, name
    if exists and _entries(run_dir):
        if not cfg.overwrite:
            raise app.UsageError(f"run directory {run_dir} exists; pick another --run_name or "
                                 "pass --overwrite")
        files.check_created(run_dir, other="--run_name")
    return run_dir, name


def _entries(run_dir) -> list[str]:
    """What a run directory holds, apart from a writer's lock file."""
    return [n for n in os.listdir(run_dir) if n != files.LOCK_FILE]


def claim_run_dir(cfg, run_dir, hold) -> str:
    """Takes the run directory for this process, once every check has passed: locks it for
    the whole run (`hold`, an ExitStack; a second train on the same --run_name, --resume
    included, is refused naming the holder), then with --overwrite empties it.

    The lock file lives in the run directory itself, so --overwrite empties the directory in
    place, lock file kept, rather than removing and re-creating it: there is no moment at which
    the directory is unlocked, and nothing between our check and the removal can slip in. The
    ownership marker goes last, so an interrupted emptying leaves a directory still ours."""
    hold.enter_context(files.OutputLock(run_dir, "train --run_name"))
    if not cfg.resume:
        entries = _entries(run_dir)
        if entries and not cfg.overwrite:  # created since plan_run_dir looked
            raise app.UsageError(f"run directory {run_dir} exists; pick another --run_name or "
                                 "pass --overwrite")
        if entries:
            files.check_created(run_dir, other="--run_name")
            for name in sorted(entries, key=lambda n: n == files.MARKER_FILE):
                path = os.path.join(run_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
    if not files.created_by_us(run_dir):
        files.mark_created(run_dir, "run")
    return run_dir


@dataclasses.dataclass
class Checked:
    """What the start-up checks established about the run, before anything is written."""

    method_cls: type
    method_config: object
    manifest: object  # data.manifest.Manifest
    target_labelled: list  # semi-supervised target cases whose labels train (usually none)
    volumes: bool  # 3D records: the segmentor trains on patches
    patch_size: tuple | None  # 3D: the training patch (the exported model's input)


@dataclasses.dataclass
class Placement:
    """Where the run executes and who writes it."""

    strategy: object
    workers: int
    chief: bool  # only the chief writes the run directory, MLflow, the export
    run_dir: str | None = None
    run_name: str | None = None


def train(cfg: RunConfig, *, callbacks=(), tags=None) -> dict:
    """Everything after flag parsing; `cfg` is the run's checked config. Returns result.json.
    `callbacks` (Keras callbacks, after the run's own, before the backup) and MLflow `tags`
    are for programs that run trainings, such as the tuner (uda_tf/cli/tune.py).

    Every check that can fail on the user's input (names, data, domains and splits, flags,
    the init checkpoint loaded into the model, the output directory) runs before the run
    directory is touched; the chief then holds the run directory's lock until it returns."""
    with contextlib.ExitStack() as hold:
        checked = check_run(cfg)
        where = place_run(cfg)
        streams = data_streams(cfg, checked, where)
        model = build_model(cfg, checked, where)
        # Every check has passed: only now is the run directory created, locked, or (with
        # --overwrite) emptied. Other workers write into a temporary directory of their own.
        if where.chief:
            where.run_dir = claim_run_dir(cfg, where.run_dir, hold)
        else:
            where.run_dir = multiworker.worker_dir(None, where.strategy)
        from uda_tf.training import tracking
        # The config as run: with the resolved run name and MLflow experiment.
        cfg = cfg.replace(run_name=where.run_name or cfg.run_name, mlflow_experiment=(
            tracking.experiment_name(cfg.mlflow_experiment, sys.argv)))
        values = cfg.flag_values()
        with files.atomic_write(os.path.join(where.run_dir, "flags.cfg")) as f:
            f.write(flagfile_text(values))
        cfg.save(os.path.join(where.run_dir, CONFIG_FILE))
        fit_args = dict(streams, run_dir=where.run_dir, values=values,
                        grad_norms=model.gradient_norms,
                        class_names=checked.manifest.class_names, callbacks=callbacks)
        if not where.chief:
            # Every worker runs the same fit with the same callbacks in the same order: reading
            # a distributed metric variable, as a backup does, is an all-reduce every worker
            # must join; only the chief tracks in MLflow, exports and evaluates.
            try:
                fit_and_keep_best(cfg, model, **fit_args)
            finally:
                multiworker.cleanup_worker_dir(where.run_dir, where.strategy)
            return {"run_dir": None, "worker": True, "evaluations": {}}
        return fit_export_evaluate(cfg, checked, where, model, values, fit_args, tags or {})


def check_run(cfg) -> Checked:
    """Every check of the flags against the prepared data, the names and the splits; raises
    UsageError naming the flag. Reads the manifest (and, with --check_shards, the shards)."""
    from uda_tf.data.integrity import verify_shards
    from uda_tf.methods import get_method
    from uda_tf.models import check_flags, input_shape_from_flags

    method_cls, method_config = get_method(cfg.method), cfg.method_config
    manifest = require_prepared_data(cfg.data_dir, cfg.dataset_source)
    check_domains(manifest, cfg.source_domain, cfg.target_domain, method_cls)
    if cfg.fda_beta and not method_cls.uses_target:
        raise app.UsageError(f"--fda_beta={cfg.fda_beta} needs target batches, which "
                             f"--method={cfg.method} does not use; pass --fda_beta=0")
    try:
        check_flags(cfg.flag_values(), manifest)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    check_selection(manifest, cfg)
    check_adaptation_flags(cfg)
    check_splits(manifest, cfg, method_cls)
    check_names(cfg)
    target_labelled = labelled_target_cases(cfg, manifest)
    volumes = manifest.record_kind == "volumes"
    # 3D: the segmentor's input is the training patch; 2D: None (whole slices).
    patch_size = tuple(input_shape_from_flags(cfg.flag_values(), manifest)[:3]) if volumes else None
    if cfg.check_shards:
        verify_shards(manifest, cfg.data_dir, {cfg.source_domain, cfg.target_domain})
    return Checked(method_cls, method_config, manifest, target_labelled, volumes, patch_size)


def place_run(cfg) -> Placement:
    """The tf.distribute strategy and this process's role; on the chief, the run directory,
    checked without writing anything. Seeds, determinism and the precision policy are set."""
    import keras

    try:
        # Flags that clash with several workers are refused before the strategy is made,
        # which waits for every worker to connect.
        workers = multiworker.cluster_size(devices.cluster_resolver(
            cfg.cluster, slurm_port_base=cfg.slurm_port_base))
        for flag, on in (("--resume", cfg.resume),
                         ("--on_divergence=rollback", cfg.on_divergence == "rollback")):
            # Both restore the chief's backup on the chief alone, which would leave the
            # workers with different weights; on several workers a diverged run stops instead.
            if on and workers > 1:
                raise app.UsageError(f"{flag} works on one machine only; this run spans "
                                     f"several workers ({workers}, --cluster={cfg.cluster})")
        strategy = devices.make_strategy(cfg.num_cpu_devices, cluster=cfg.cluster,
                                         slurm_port_base=cfg.slurm_port_base)
    except ValueError as err:  # a --cluster that is not there, or a flag that clashes with it
        raise app.UsageError(str(err)) from err
    workers = multiworker.num_workers(strategy)
    check_global_batch(cfg.global_batch_size, strategy.num_replicas_in_sync)
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy(devices.mixed_precision_policy())
    where = Placement(strategy, workers, multiworker.is_chief(strategy))
    if where.chief:  # other workers write nowhere but a temporary directory
        where.run_dir, where.run_name = plan_run_dir(cfg)  # writes nothing
        guards.check_writable(cfg.output_dir, "--output_dir")  # before any work, not at the end
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    return where


def check_global_batch(global_batch_size: int, replicas: int) -> None:
    """tf.distribute cuts a batch into pieces of ceil(batch / replicas); when the last replica
    would get none, a model cannot train on its empty batch."""
    piece = -(-global_batch_size // replicas)
    if (replicas - 1) * piece >= global_batch_size:
        raise app.UsageError(
            f"--global_batch_size={global_batch_size} on {replicas} replicas leaves a replica "
            f"without samples (batches are split in pieces of {piece}); use a multiple of "
            f"{replicas}")


def data_streams(cfg, checked: Checked, where: Placement) -> dict:
    """What fit reads: `train_ds_after(batches)`, the source validation stream and its step
    count, and the target validation stream of the label-free criteria (or None)."""
    from uda_tf.data import augment, pipeline
    manifest, patch_size = checked.manifest, checked.patch_size
    uses_target = checked.method_cls.uses_target

    def train_ds_after(batches):
        """The training stream after `batches` batches (resume.py): replayed and skipped
        under --deterministic, else re-seeded with the position."""
        ds = pipeline.train_dataset(
            cfg.data_dir, manifest, source=cfg.source_domain,
            target=cfg.target_domain if uses_target else None,
            global_batch_size=cfg.global_batch_size, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed if cfg.deterministic else cfg.seed + batches,
            augmentations=cfg.augment, target_augmentations=cfg.target_augment or None,
            augment_params=augment.parse_params(cfg.augment_params), fda_beta=cfg.fda_beta,
            patch_size=patch_size, foreground_fraction=cfg.foreground_fraction,
            patches_per_volume=cfg.patches_per_volume, num_workers=where.workers,
            labelled_target=(cfg.target_domain, checked.target_labelled,
                             labelled_per_batch(cfg)) if checked.target_labelled else None)
        return ds.skip(batches) if cfg.deterministic else ds

    # Validation repeats with a step count of exactly one pass, so every epoch sees every
    # source-validation slice (3D: every tile of every volume) once (and Keras does not hit
    # the end of a finite dataset). Batches are padded to a multiple of the replica count,
    # the padding weighted 0: any number of replicas and workers and any split size, and the
    # Dice of exactly the real slices (pipeline.pad_batch).
    batch = cfg.global_batch_size
    padded = pipeline.padded_batch_size(batch, where.strategy.num_replicas_in_sync)
    if checked.volumes:
        val_ds = pipeline.eval_patches(cfg.data_dir, manifest, cfg.source_domain, "val",
                                       patch_size, batch_size=batch, pad_to_batch=padded)
        val_count = pipeline.num_eval_patches(manifest, cfg.source_domain, "val", patch_size)
    else:
        val_ds = pipeline.eval_dataset(cfg.data_dir, manifest, cfg.source_domain, "val",
                                       batch_size=batch, pad_to_batch=padded)
        val_count = manifest.num_records(cfg.source_domain, "val")
    return dict(train_ds_after=train_ds_after, val_ds=val_ds.repeat(),
                val_steps=math.ceil(val_count / batch),
                target_val_fn=target_val_dataset_fn(cfg, manifest, checked.volumes, patch_size))


def make_segmentor(cfg, manifest, sync_batchnorm=False):
    from uda_tf.models import segmentor_from_flags
    return segmentor_from_flags(cfg.flag_values(), manifest, sync_batchnorm=sync_batchnorm)


def build_model(cfg, checked: Checked, where: Placement):
    """The method around a fresh segmentor (or --init_checkpoint's, --freeze_layers applied),
    compiled with every optimizer built, under the strategy's scope."""
    strategy = where.strategy
    with strategy.scope():
        segmentor = make_segmentor(
            cfg, checked.manifest,
            sync_batchnorm=cfg.sync_batchnorm and strategy.num_replicas_in_sync > 1)
        try:
            if cfg.init_checkpoint:
                adapt.load_init_checkpoint(segmentor, cfg.init_checkpoint)
            if cfg.freeze_layers:
                frozen = adapt.freeze_layers(segmentor, cfg.freeze_layers)
                logging.warning("frozen segmentor layers: %s", ", ".join(frozen))
        except (ValueError, FileNotFoundError) as err:
            raise app.UsageError(str(err)) from None
        model = checked.method_cls.build(segmentor, checked.manifest.class_names,
                                         checked.method_config, cfg)
    from uda_tf.training.selection import check_model
    try:
        check_model(cfg.select_on, model)  # a criterion that needs the method's two networks
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    return model


def fit_export_evaluate(cfg, checked: Checked, where: Placement, model, values,
                        fit_args, tags=None) -> dict:
    """The chief's run, tracked in MLflow from start to end: fit, export the kept segmentor,
    evaluate the export, report. The MLflow run ends FINISHED only if all of it did."""
    tracker, epoch_logger = start_tracking(cfg, checked, where, values, tags or {})
    status = "FAILED"
    try:
        checkpoint, train_seconds = fit_and_keep_best(cfg, model, **fit_args,
                                                      epoch_logger=epoch_logger)
        export_path, exported_weights = export_best(cfg, checked, checkpoint.path,
                                                    where.run_dir, tracker)
        serve, evaluations = evaluate_export(cfg, checked, export_path, where.run_dir, tracker,
                                             step=checkpoint.best_epoch)
        log_test_table(evaluations, where.run_dir, tracker)
        if cfg.figures:
            log_figures(cfg, checked, serve, where.run_dir, tracker, epoch_logger,
                        checkpoint.best_epoch)
        # Named after the run; MLflow links the metrics logged at the kept epoch's step (its
        # epoch logs, the test metrics and best_*) to the logged model.
        tracker.log_saved_model(export_path, register_name=cfg.register_model_name,
                                alias=cfg.register_alias, name=cfg.run_name,
                                step=checkpoint.best_epoch,
                                input_example=cfg.mlflow_input_example)
        result = report(cfg, values, where.run_dir, tracker, epoch_logger, checkpoint,
                        train_seconds, exported_weights, export_path, evaluations)
        status = "FINISHED"
        return result
    finally:
        tracker.finish(status)  # flushes; if MLflow is unreachable: <run_dir>/mlflow_unsent.json


def start_tracking(cfg, checked: Checked, where: Placement, values, extra_tags=None):
    """The MLflow run (resumed with --resume) with the run's flags, tags, flags.cfg and the
    dataset's manifest; returns the tracker and the epoch logger fit reports to."""
    from uda_tf.training import tracking
    uri = cfg.mlflow_tracking_uri or tracking.default_tracking_uri(cfg.output_dir)
    tags = {"git_commit": tracking.git_commit(os.path.dirname(os.path.abspath(__file__))),
            "dataset_content_hash": checked.manifest.content_hash, "method": cfg.method,
            "target_labels_in_training": str(bool(cfg.target_labelled_cases)).lower(),
            **tracking.environment_tags(where.strategy)}
    tracking.set_http_defaults()
    tracker = tracking.RunTracker(uri, where.run_dir, cfg.mlflow_experiment, cfg.run_name,
                                  resume=cfg.resume, system_metrics=cfg.mlflow_system_metrics)
    tracker.log_params(values)
    tracker.set_tags({**tags, "mlflow.note.content": run_description(cfg, checked),
                      **(extra_tags or {})})
    # The prepared dataset as the run's input, identified by its manifest's hash (MLflow's
    # digest column holds 36 characters: the first 32 of the hash; the whole hash is the
    # dataset_content_hash tag).
    tracker.log_input(checked.manifest.dataset_name or os.path.basename(cfg.data_dir),
                      (checked.manifest.content_hash or "unhashed")[:32],
                      os.path.abspath(cfg.data_dir), "training")
    tracker.log_artifact(os.path.join(where.run_dir, "flags.cfg"))
    tracker.log_artifact(os.path.join(cfg.data_dir, "manifest.json"))
    tracker.flush()  # a failure is kept and retried at the next epoch; training goes on
    return tracker, tracking.MlflowEpochLogger(tracker)


def run_description(cfg, checked: Checked) -> str:
    """The MLflow run's description (markdown): method, shift, data and how the exported
    checkpoint was chosen."""
    method_cls = METHODS[cfg.method]  # its module's docstring opens with what it does
    method_doc = " ".join((sys.modules[method_cls.__module__].__doc__ or "").strip()
                          .split("\n\n")[0].split())
    shift = (f"`{cfg.source_domain}` (labelled) → `{cfg.target_domain}` (unlabelled"
             + (f", {len(cfg.target_labelled_cases)} labelled cases" if cfg.target_labelled_cases
                else "") + ")") if cfg.target_domain else f"`{cfg.source_domain}` only"
    source = cfg.dataset_source or os.path.abspath(cfg.data_dir)
    return (f"**{cfg.method}**: {method_doc}\n\n"
            f"Shift: {shift}; {'3D volumes' if checked.volumes else '2D slices'} of "
            f"{checked.manifest.dataset_name} from {source}.\n\n"
            f"Kept checkpoint: the epoch with the best `{cfg.select_on}`; the model is "
            f"exported to `{cfg.model_name}` and logged as `{cfg.run_name}`.")


def export_best(cfg, checked: Checked, ckpt_path, run_dir, tracker):
    """The kept segmentor, rebuilt outside the strategy so the SavedModel holds plain
    variables (in float32 whatever the training precision), with AdaBN's target statistics
    when asked, exported to <run_dir>/export, with the networks the method exports beside it
    (AttENT's translators) rebuilt alike from the kept epoch's files, in a `translate`
    signature. Returns (SavedModel path, weights exported)."""
    import keras

    from uda_tf.data import pipeline
    from uda_tf.serving.export import export_segmentor, exported_networks_of
    keras.mixed_precision.set_global_policy("float32")
    segmentor = make_segmentor(cfg, checked.manifest)
    segmentor.load_weights(ckpt_path)
    exported_weights = ckpt_path
    if cfg.adabn:
        target_images = pipeline.domain_stream(
            cfg.data_dir, checked.manifest, cfg.target_domain, "train",
            batch_size=cfg.global_batch_size, labelled=False, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed, augment_data=False, patch_size=checked.patch_size)
        used = adapt.reestimate_batchnorm(segmentor, target_images, cfg.adabn_batches)
        tracker.log_metrics({"adabn_batches_used": used}, flush=False)
        # Kept beside the source-statistics checkpoint, so uda-export can rebuild either.
        exported_weights = os.path.join(os.path.dirname(ckpt_path), "best_adabn.weights.h5")
        with files.atomic_write(exported_weights, None) as tmp:
            segmentor.save_weights(tmp)
    # the kept epoch's translators (AttENT), saved beside the segmentor by the checkpoint
    translators = exported_networks_of(cfg, ckpt_path, tuple(segmentor.input_shape[1:]),
                                       "the checkpoint")
    export_path = export_segmentor(segmentor, os.path.join(run_dir, "export"), cfg.model_name,
                                   manifest=checked.manifest, config=cfg,
                                   translators=translators)
    return export_path, exported_weights


def evaluate_export(cfg, checked: Checked, export_path, run_dir, tracker, step=0):
    """The exported SavedModel scored on the labelled test cases of the source and, as an
    oracle never used to choose anything, the target. Returns (serving function,
    {role: evaluation})."""
    from uda_tf.evaluation import inference
    from uda_tf.evaluation.evaluate import evaluate_model
    from uda_tf.serving.export import load_serving_fn
    serve = load_serving_fn(export_path)
    if checked.volumes:  # whole volumes by Gaussian sliding window over the model's patches
        predict = inference.volume_predict_fn(inference.saved_model_fn(serve),
                                              checked.patch_size)
    else:
        predict = lambda images: serve(image=images)  # noqa: E731  labels + entropy
    evaluations = {}
    for role, domain in (("source", cfg.source_domain), ("target", cfg.target_domain)):
        if domain is None or not checked.manifest.labelled_cases(domain, "test"):
            continue  # nothing to score against (an unlabelled target is the UDA norm)
        oracle = role == "target"
        out = os.path.join(run_dir, "eval", f"{role}_test")
        summary = evaluate_model(predict, cfg.data_dir, checked.manifest, domain, "test", out,
                                 oracle=oracle, figures=cfg.figures)
        tracker.log_metrics(summary_metrics(summary, f"{'oracle/' if oracle else ''}"
                                                     f"{role}_test"), step=step, flush=False)
        tracker.log_artifact(out, artifact_path=f"eval/{role}_test")
        evaluations[role] = {"domain": domain, "dir": out, "summary": summary}
    return serve, evaluations


def log_test_table(evaluations, run_dir, tracker) -> None:
    """Every test metric of the export in one table, a row per domain x class x metric
    (mean, std and cases): eval/test_metrics.csv, and test_metrics.json in the table format
    MLflow's UI shows (columns + data, as mlflow.log_table writes)."""
    from uda_tf.evaluation.evaluate import METRIC_NAMES
    columns = ["role", "domain", "class", "metric", "mean", "std", "cases"]
    rows = []
    for role, ev in evaluations.items():
        summary = ev["summary"]
        for name, stats in [*summary["classes"].items(), ("mean", summary["foreground"])]:
            for metric in METRIC_NAMES:
                if metric in stats:
                    s = stats[metric]
                    rows.append([("oracle/" if role == "target" else "") + role, ev["domain"],
                                 name, metric, s["mean"], s["std"], s["n"]])
    if not rows:
        return
    out = os.path.join(run_dir, "eval")
    os.makedirs(out, exist_ok=True)
    with files.atomic_write(os.path.join(out, "test_metrics.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    files.write_json(os.path.join(out, "test_metrics.json"), {"columns": columns, "data": rows})
    for name in ("test_metrics.csv", "test_metrics.json"):
        tracker.log_artifact(os.path.join(out, name))
    # what mlflow.log_table records: the UI lists the file as a table
    tracker.set_tags({"mlflow.loggedArtifacts": json.dumps(
        [{"path": "test_metrics.json", "type": "table"}])})


def log_figures(cfg, checked: Checked, serve, run_dir, tracker, epoch_logger,
                best_epoch=None) -> None:
    """Learning curves, the source/target picture with the kept epoch, and sample target
    slices with entropy (no target label read)."""
    from uda_tf.evaluation import figures
    from uda_tf.training.selection import selection_monitor
    plots = os.path.join(run_dir, "plots")
    for path in figures.learning_curves(epoch_logger.history, plots):
        tracker.log_artifact(path, artifact_path="plots")
    gap = figures.domain_gap(epoch_logger.history, os.path.join(plots, "domain_gap.png"),
                             best_epoch=best_epoch, monitor=selection_monitor(cfg.select_on)[0])
    if gap:
        tracker.log_artifact(gap, artifact_path="plots")
    sample = figures.sample_segmentations(
        serve, cfg.data_dir, checked.manifest, cfg.target_domain or cfg.source_domain,
        os.path.join(run_dir, "samples", "segmentations.png"), count=cfg.mlflow_sample_slices)
    if sample:
        tracker.log_artifact(sample, artifact_path="samples")


def report(cfg, values, run_dir, tracker, epoch_logger, checkpoint, train_seconds,
           exported_weights, export_path, evaluations) -> dict:
    """The run's final metrics to MLflow and <run_dir>/result.json (written last)."""
    from uda_tf.training import tracking
    from uda_tf.training.selection import selection_monitor
    monitor, _ = selection_monitor(cfg.select_on)
    at_best = {name: dict(history).get(checkpoint.best_epoch)
               for name, history in epoch_logger.history.items()}
    tracker.log_metrics({f"best_{monitor}": checkpoint.best, "best_epoch": checkpoint.best_epoch,
                         "train_seconds": train_seconds},  # sends everything logged before
                        step=checkpoint.best_epoch)
    uri = tracker.tracking_uri
    result = {"run_dir": run_dir, "run_name": cfg.run_name, "method": cfg.method,
              "mlflow": {"tracking_uri": uri, "run_id": tracker.run_id,
                         "experiment": cfg.mlflow_experiment,
                         "model": tracker.model_info, "ui": tracking.ui_command(uri)},
              "selection": {"select_on": cfg.select_on, "monitor": monitor,
                            "best": checkpoint.best, "best_epoch": checkpoint.best_epoch,
                            "epoch_logs": at_best},
              "best_epoch": checkpoint.best_epoch,
              "best_val_dice": at_best.get("val_dice"),  # source val Dice of the kept epoch
              "checkpoint": checkpoint.path, "exported_weights": exported_weights,
              "saved_model": export_path, "train_seconds": train_seconds,
              "evaluations": evaluations}
    with files.atomic_write(os.path.join(run_dir, "result.json")) as f:
        json.dump(result, f, indent=2)
    return result


def target_val_dataset_fn(cfg, manifest, volumes, patch_size):
    """What the label-free target criteria read each epoch (and oracle/val_dice when the user
    has target labels): a function giving the target validation slices, or for 3D models the
    target validation volumes cut into the model's patches; None when there are none or the
    criteria are off. The checkpoint follows --select_on only."""
    from uda_tf.data import pipeline
    target_val = cfg.target_domain is not None and bool(
        manifest.cases(cfg.target_domain, "val"))
    if not target_val or not (cfg.target_criteria or cfg.select_on != "source_dice"):
        return None
    if volumes:
        return lambda: pipeline.eval_patches(
            cfg.data_dir, manifest, cfg.target_domain, "val", patch_size,
            batch_size=cfg.global_batch_size, with_metadata=True)
    return lambda: pipeline.eval_dataset(
        cfg.data_dir, manifest, cfg.target_domain, "val", batch_size=cfg.global_batch_size,
        with_metadata=True)


def fit_and_keep_best(cfg, model, *, train_ds_after, val_ds, val_steps, run_dir, values,
                      grad_norms, class_names, target_val_fn, epoch_logger=None,
                      callbacks=()):
    """Train with the run's callbacks: divergence guard, the method's own, checkpoint
    selection (with the label-free target criteria on `target_val_fn`), the MLflow epoch
    logger (chief only) and full-state backups. Every worker of a multi-worker run calls this
    alike. Writes <run_dir>/checkpoints/. Returns (checkpoint callback, seconds)."""
    from uda_tf.training import guards, resume
    from uda_tf.training.selection import selection_callbacks

    ckpt_path = os.path.join(run_dir, "checkpoints", "best.weights.h5")
    selection = selection_callbacks(cfg.select_on, ckpt_path, dataset_fn=target_val_fn,
                                    class_names=class_names)
    checkpoint = selection[-1]
    os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
    for name in ("flags.cfg", CONFIG_FILE):
        shutil.copy(os.path.join(run_dir, name), os.path.join(os.path.dirname(ckpt_path), name))
    # The checkpoint directory is self-contained for `uda-export` (weights, flags, data).
    shutil.copy(os.path.join(cfg.data_dir, "manifest.json"),
                os.path.join(os.path.dirname(ckpt_path), "manifest.json"))
    backup = resume.TrainingBackup(
        os.path.join(run_dir, resume.BACKUP_DIR), steps_per_epoch=cfg.steps_per_epoch,
        every_steps=cfg.backup_every_steps, flags=values)
    guard = guards.DivergenceGuard(grad_norms, policy=cfg.on_divergence, backup=backup,
                                   max_rollbacks=cfg.max_rollbacks)
    backup.stateful.update(checkpoint=checkpoint, guard=guard)
    if epoch_logger is not None:
        backup.stateful["epoch_logger"] = epoch_logger
    own = model.training_callbacks()
    loggers = [] if epoch_logger is None else [epoch_logger]
    pictures = [c for c in own if hasattr(c, "epoch_figures")]
    if epoch_logger is not None and pictures:  # e.g. AttENT's translation panels
        from uda_tf.evaluation.figures import image_grid
        from uda_tf.training.tracking import EpochFigures
        loggers.append(EpochFigures(pictures, os.path.join(run_dir, "plots"),
                                    epoch_logger.tracker, image_grid))
    start = time.time()
    # Order matters: the guard checks a step before it is backed up and adds gradient
    # norms to the epoch logs before they are logged; the backup saves last.
    resume.fit_from_backup(
        model, train_ds_after, backup, epochs=cfg.epochs,
        steps_per_epoch=cfg.steps_per_epoch, validation_data=val_ds,
        validation_steps=val_steps, shuffle=False, verbose=2 if epoch_logger else 0,
        callbacks=[guard, *own, *selection, *loggers, *callbacks, backup])
    return checkpoint, time.time() - start


def summary_metrics(summary, prefix) -> dict:
    """MLflow metrics of an evaluation summary: each volume metric per class and averaged over
    foreground classes. A statistic over no case (null in summary.json, e.g. distances when
    every mask of a class is empty) is left out rather than logged as a number."""
    out = {}
    for metric in ("dice", "surface_dice", "assd", "hd95"):
        for name, stats in [*summary["classes"].items(), ("mean", summary["foreground"])]:
            if stats[metric]["mean"] is not None:
                out[f"{prefix}/{metric}_{name}"] = stats[metric]["mean"]
    return out


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TF's SavedModel writer logs every file at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from uda_tf.training.guards import DivergenceError
    from uda_tf.data.integrity import ShardCorruptedError
    from uda_tf.training.resume import BackupError
    try:
        cfg = RunConfig.from_flags(resolved_flags())
    except ValueError as e:  # a value or a rule between flags; the message names the flag
        raise app.UsageError(str(e)) from None
    try:
        result = train(cfg)
    except (DivergenceError, BackupError, OSError, ShardCorruptedError, files.BadNameError,
            files.OutputLockedError, files.NotOurDirectoryError) as e:
        sys.exit(f"train: error: {e}")
    if result.get("worker"):
        print("worker done; the chief writes the run")
        return
    print(f"run directory: {result['run_dir']}")
    sel = result["selection"]
    print(f"kept epoch {sel['best_epoch']} by --select_on={sel['select_on']} "
          f"({sel['monitor']} = {sel['best']:.4f})")
    for role, ev in result["evaluations"].items():
        fg = ev["summary"]["foreground"]["dice"]
        tag = " (oracle: target labels, not used for selection)" if role == "target" else ""
        print(f"{role} test Dice ({ev['domain']}): {fg['mean']:.4f} ± {fg['std']:.4f}{tag}")
    print(f"SavedModel: {result['saved_model']}")
    print(f"MLflow: {result['mlflow']['ui']}")


def train_sections() -> list[tuple[str, str]]:
    """`--help`'s groups: RunConfig's sections, and the methods' settings after --head."""
    sections = list(config.FLAG_SECTIONS)
    after = _NAMES.index(config.METHOD_SETTINGS_AFTER) + 1
    run_fields = {f.name for f in settings.fields(RunConfig)}
    if after < len(_NAMES) and _NAMES[after] not in run_fields:
        sections.append(("method settings (read by the --method their text names, else by "
                         "every method)", _NAMES[after]))
    return sections


ABOUT = """Train a segmentor with a domain adaptation method on a prepared dataset (labelled
source scans, unlabelled target scans), keep the checkpoint a label-free criterion chooses,
export it as a SavedModel, evaluate it on the test splits and track the run in MLflow.
Writes <output_dir>/<run_name>/ (checkpoints, export, evaluation, result.json).

example: python train.py --flagfile=uda:demo --data_dir=demo_out/prepared --method=grl
         python train.py --flagfile=demo_out/train.cfg --method=grl   (after make demo)"""


def run():
    entry.run(main, define_flags, ABOUT, sections=train_sections)


if __name__ == "__main__":
    sys.exit(run())
