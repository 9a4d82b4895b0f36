"""A run's configuration, typed and checked once: `RunConfig`, built from train.py's flags.

Every run-level flag is a field declared with `settings.setting` (the same mechanism as a
method's `Config`), so train.py generates its absl flags from here and `from_flags` converts
and checks the values with the same bounds, choices and rules. The chosen method's own
checked `Config` travels in `method_config`. A run saves its config as JSON (`save`,
`CONFIG_FILE`) next to its checkpoint and in its export; export and predict read it back
(`load`), or for runs made before config.json existed parse their flags.cfg
(`from_flagfile`), and build the segmentor from typed values.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from uda_tf import files
from uda_tf.data.augment import check_names_flag, check_params_flag
from uda_tf.methods import METHODS, settings
from uda_tf.methods.schedules import LR_SCHEDULES
from uda_tf.methods.settings import setting
from uda_tf.models import DEFAULT_UNET_DEPTH, MODELS
from uda_tf.models.heads import HEADS
from uda_tf.models.layers import NORMALIZATIONS
from uda_tf.training.devices import CLUSTERS
from uda_tf.training.guards import DivergenceGuard
from uda_tf.training.selection import SELECT_ON

CONFIG_FILE = "config.json"
CONFIG_VERSION = 1
#: the run flag after which the method's settings come, in flags.cfg and in the flag list
METHOD_SETTINGS_AFTER = "head"
# The groups train.py's --help lists the flags in: (title, the field the group starts at);
# the fields below are declared in this order.
FLAG_SECTIONS = (
    ("data", "data_dir"), ("method and model", "method"),
    ("initialisation and AdaBN", "init_checkpoint"), ("optimisation", "epochs"),
    ("devices and precision", "num_cpu_devices"), ("outputs and tracking", "output_dir"),
    ("model selection", "select_on"), ("reliability and resume", "deterministic"))


# -- checks of single values the bounds cannot describe (also train.py's absl validators) --

def check_augment(name: str, value) -> None:
    if name == "target_augment" and not value:
        return  # empty: as --augment
    check_names_flag(name, value)


def check_patch_size(name: str, value) -> None:
    try:
        ok = not value or (len(value) == 3 and all(int(v) >= 1 for v in value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--{name}={','.join(map(str, value))}: expected three positive "
                         "integers H,W,D, or nothing")


#: rules between run flags: (flags read, whether the values pass, the error)
CROSS_FIELD_RULES = (
    (("resume", "run_name"), lambda v: not v["resume"] or bool(v["run_name"]),
     "--resume needs --run_name: the run directory to continue"),
    (("register_alias", "register_model_name"),
     lambda v: not v["register_alias"] or bool(v["register_model_name"]),
     "--register_alias needs --register_model_name"),
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every run-level flag of train.py, typed (list flags are tuples), plus the chosen
    method's checked `Config` in `method_config`. Build it with `from_flags`, `load` or
    `from_flagfile`; it never changes (`replace` makes a checked copy)."""
    # data
    data_dir: str | None = setting(None, "Prepared dataset: a directory with manifest.json "
                                   "(python -m uda_tf.cli.prepare).", kind="string")
    dataset_source: str = setting("", "Where the raw dataset comes from and how to prepare "
                                  "it; printed when --data_dir holds no prepared dataset.")
    source_domain: str | None = setting(
        None, "Labelled source domain (a domain in the manifest).", kind="string")
    target_domain: str | None = setting(
        None, "Unlabelled target domain; its labels are never read for training or "
        "checkpoint choice.", kind="string")
    target_labelled_cases: str = setting(
        "", "Semi-supervised: target training cases whose labels may train the segmentor "
        "(comma list of case ids, or a count N for the first N in sorted order). Empty "
        "(default): no target label is ever read for training.")
    target_labelled_per_batch: int = setting(
        0, "Semi-supervised: labelled target samples in each batch, in place of as many "
        "source ones (0: a quarter of --global_batch_size, at least 1).", lower=0)
    shuffle_buffer: int = setting(2048, "Slices in each domain's shuffle buffer.", lower=1)
    augment: str = setting(
        "default", "Source training augmentation: a preset (none, flip, default = flips + "
        "intensity jitter, full = flips, rotation, scaling, elastic, gamma, contrast, "
        "brightness, noise, bias field, blur, randomized = full + label_intensity: a random "
        "mean and texture scale per label region of labelled images, full_gin = full + gin: "
        "a random shallow conv net per image, full_curve = full + intensity_curve: a random "
        "smooth intensity curve per image, which may invert the contrast) or comma-separated "
        "op names of "
        "uda_tf.data.augment (e.g. full's names plus gin).", check=check_augment)
    target_augment: str = setting("", "Target training augmentation, as --augment (empty: "
                                  "the same as --augment).", check=check_augment)
    augment_params: tuple = setting(
        (), "Augmentation parameters and per-sample probabilities, name=value (a range as "
        "low:high), e.g. rotation_degrees=10,p_elastic=0.3,noise_std=0:0.05.", kind="list",
        item=str, check=check_params_flag)
    fda_beta: float = setting(
        0.0, "Fourier domain adaptation of source batches towards the paired target batch "
        "(Yang & Soatto 2020): half-width of the swapped low-frequency band as a fraction of "
        "the image size, e.g. 0.01; 0: off. Needs a method that uses the target domain.",
        lower=0, upper=0.5)
    foreground_fraction: float = setting(
        1 / 3, "3D datasets: share of patches centred on a foreground voxel (nnU-Net "
        "oversampling).", lower=0, upper=1)
    patches_per_volume: int = setting(1, "3D datasets: patches cut from each volume read.",
                                      lower=1)
    # method and model
    method: str = setting("source_only", "Adaptation method.", choices=METHODS)
    model: str = setting("unet2d", "Segmentor: " + "; ".join(
        f"{n}: {s.about}" for n, s in MODELS.items()) + ". 2D models train on slices, 3D "
        "models on patches of volumes (prepare --output=volumes).", choices=tuple(MODELS))
    base_filters: int = setting(16, "Filters of the first block of the segmentor (U-Nets "
                                "double them per level).", lower=1)
    unet_depth: int = setting(
        DEFAULT_UNET_DEPTH, "U-Nets (" + ", ".join(n for n, s in MODELS.items() if s.has_depth)
        + "): down-sampling levels below the first block; the input (slice or --patch_size) "
        "must divide by 2^depth. Fewer levels for small inputs, as nnU-Net plans its pooling "
        "by the patch size.", lower=1)
    norm: str = setting("instance", "Normalisation layers (batch norm: see "
                        "--sync_batchnorm).", choices=NORMALIZATIONS)
    sync_batchnorm: bool = setting(
        True, "--norm=batch on several replicas: batch statistics over the global batch "
        "(synchronised BatchNorm, the same update as one device); --nosync_batchnorm: each "
        "replica normalises with its own share of the batch.")
    patch_size: tuple | None = setting(
        None, "3D models: training patch h,w,d cropped from the volumes (also the exported "
        "model's input; whole volumes are evaluated by sliding window). Default: the "
        "prepared volume size.", kind="list", item=int, check=check_patch_size)
    head: str = setting("softmax", "Softmax over num_classes logits, or one sigmoid logit "
                        "(two-class datasets only).", choices=HEADS)
    # (here come every registered method's settings: uda_tf/methods, each method's Config)
    init_checkpoint: str = setting(
        "", "Start the segmentor from these weights (a <run>/checkpoints/best.weights.h5 of "
        "an earlier run, e.g. source-only) instead of a random initialisation.")
    freeze_layers: str = setting(
        "", "Regular expression (matched at the start of layer names, e.g. 'enc0|enc1' or "
        "'dec|logits'): matching segmentor layers are not trained. Empty: train all.")
    adabn: bool = setting(
        False, "AdaBN: after training, re-estimate every BatchNorm layer's statistics on "
        "target training images before export (needs --norm=batch and --target_domain; "
        "works with any --method).")
    adabn_batches: int = setting(100, "AdaBN: target batches of --global_batch_size slices "
                                 "to average the statistics over.", lower=1)
    # optimisation
    epochs: int = setting(10, "Epochs.", lower=1)
    steps_per_epoch: int = setting(100, "Training steps per epoch.", lower=1)
    global_batch_size: int = setting(
        16, "Source slices per step over all replicas (the same number of target slices is "
        "added for methods that use target data).", lower=1)
    learning_rate: float = setting(1e-3, "Adam learning rate of the segmentor.", lower=0)
    lr_schedule: str = setting(
        "constant", "Learning-rate schedule of the segmentor: constant, step (x--lr_decay "
        "per epoch), poly ((1 - t/T)^0.9, nnU-Net) or cosine.", choices=tuple(LR_SCHEDULES))
    lr_decay: float = setting(0.75, "Step schedule: factor per epoch.", lower=0, upper=1)
    warmup_steps: int = setting(0, "Linear learning-rate warm-up over this many steps "
                                "(every schedule).", lower=0)
    seed: int = setting(0, "Random seed (weights, shuffling, augmentation).")
    jit_compile: bool = setting(False, "Compile train/test steps with XLA.")
    # devices
    num_cpu_devices: int = setting(
        1, "On a machine without GPUs, split the CPU into this many logical devices and "
        "mirror over them (used by tests).", lower=1)
    cluster: str = setting(
        "auto", "Multi-worker training (MultiWorkerMirroredStrategy): the cluster from the "
        "TF_CONFIG environment variable, from the Slurm job step (srun), none, or auto "
        "(TF_CONFIG if it names several tasks, else Slurm if the step has several tasks). "
        "Only the chief writes the run.", choices=CLUSTERS)
    slurm_port_base: int = setting(8888, "Slurm clusters: first port of the workers on each "
                                   "node.", lower=1, upper=65535)
    mixed_precision: bool = setting(
        False, "Compute in mixed precision: mixed_float16 with loss scaling on GPU, "
        "mixed_bfloat16 on CPU; weights and outputs stay float32.")
    # outputs
    output_dir: str = setting("runs", "Root of the run directories.")
    run_name: str = setting("", "Run directory under --output_dir and MLflow run name: a "
                            "plain name, no '/' or '..' (default: <method>-<timestamp>).")
    overwrite: bool = setting(
        False, "Replace an existing run directory of the same name, once every check has "
        "passed; only a run directory uda_tf created (it holds .uda_tf_created) is emptied, "
        "never another directory.")
    model_name: str = setting("uda_segmentor", "SavedModel name: exported to "
                              "<run_dir>/export/<model_name>/<version>.")
    mlflow_tracking_uri: str = setting("", "MLflow tracking URI (default: sqlite store "
                                       "<output_dir>/mlflow.db).")
    mlflow_experiment: str = setting(
        "", "MLflow experiment name (default: the --flagfile's basename without .cfg, one "
        "experiment per config; else uda_tf).")
    mlflow_system_metrics: bool = setting(
        True, "Log the machine's CPU, memory, disk, network (and GPU with pynvml) use to the "
        "MLflow run every 10 s (MLflow system metrics, system/*).")
    mlflow_input_example: bool = setting(
        True, "Store an input example (one blank image; 2D inputs of at most 2^18 values) with "
        "the logged model; MLflow checks it by serving it through the model (about a second "
        "per run; sweeps and smoke tests may turn it off).")
    resume: bool = setting(
        False, "Continue in the existing run directory --run_name (not wiped) from its "
        "newest backup, and its MLflow run (<run_dir>/mlflow_run_id) with what "
        "<run_dir>/mlflow_unsent.json holds. A run stopped before its first backup starts "
        "again from scratch there; a directory that is no run is refused.")
    register_model_name: str = setting(
        "", "Register the exported model in the MLflow Model Registry under this name "
        "(empty: do not register).")
    register_alias: str = setting("", "Alias (e.g. champion) for the registered version; "
                                  "needs --register_model_name.")
    # model selection
    select_on: str = setting(
        "source_dice", "Which epoch's segmentor is kept and exported: source_dice (Dice on "
        "source validation labels), target_entropy (lowest mean prediction entropy on target "
        "validation images), target_agreement (highest Dice between predictions of flipped "
        "copies of target validation images), target_teacher_agreement (highest Dice between "
        "the teacher's and the student's predictions on target validation images; "
        "mean_teacher) or oracle (Dice on target validation labels: only when you have them "
        "and say so).", choices=SELECT_ON)
    target_criteria: bool = setting(
        True, "Also compute the label-free target criteria (target_entropy, "
        "target_agreement) and, where target validation labels exist, oracle/val_dice every "
        "epoch, for the record; they cost three forward passes over the target validation "
        "split.")
    mlflow_sample_slices: int = setting(4, "Target validation slices in the logged "
                                        "sample-segmentation figure (0: none).", lower=0)
    figures: bool = setting(
        True, "PNG figures of the run (learning curves, sample segmentations, the test "
        "evaluations' box plots and overlays), in the run directory and MLflow; --nofigures "
        "for runs where only the numbers matter (sweeps, smoke tests): matplotlib takes "
        "about as long as exporting the model.")
    # reliability (uda_tf/training/resume.py, guards.py)
    deterministic: bool = setting(
        False, "Op determinism and seeded data: a run resumed from a backup ends with the "
        "same weights as an uninterrupted one (slower).")
    backup_every_steps: int = setting(
        100, "Back up the whole training state (weights, every optimizer, schedules, epoch, "
        "step) to <run_dir>/backup every this many steps and at every epoch end (0: epoch "
        "ends only); --resume continues from it.", lower=0)
    on_divergence: str = setting(
        "stop", "A non-finite loss term or gradient norm: stop naming it, or roll back to "
        "the last backup and skip the batches since.", choices=DivergenceGuard.POLICIES)
    check_shards: bool = setting(
        True, "Check the sha256 of every shard used against the manifest before training (a "
        "corrupted shard is named, not met mid-epoch).")
    max_rollbacks: int = setting(3, "--on_divergence=rollback: stop after this many.",
                                 lower=0)
    # not a flag: the chosen method's checked Config (METHODS[method].configure)
    method_config: Any = None

    def check(self) -> None:
        """The rules between run flags (`CROSS_FIELD_RULES`); a ValueError names them."""
        for names, passes, message in CROSS_FIELD_RULES:
            if not passes({n: getattr(self, n) for n in names}):
                raise ValueError(message)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, values: dict) -> "RunConfig":
        """From flag values (train.py's resolved flags, or typed ones; keys that are no flag
        of this run are ignored, a missing flag takes its default): each converted and
        checked against its declaration, the rules between flags, then the method's Config.
        The ValueError names the flag."""
        config = settings.from_values(cls, values)
        method_config = METHODS[config.method].configure(values)
        return dataclasses.replace(config, method_config=method_config)

    def replace(self, **changes) -> "RunConfig":
        """A copy with `changes` (flag name -> value), checked as `from_flags` checks."""
        return RunConfig.from_flags({**self.flag_values(), **changes})

    def flag_values(self) -> dict:
        """Every flag of this run, the method's settings included: name -> value, in the
        order train.py defines them (flags.cfg's)."""
        out = {}
        for f in settings.fields(RunConfig):
            out[f.name] = getattr(self, f.name)
            if f.name == METHOD_SETTINGS_AFTER and self.method_config is not None:
                out.update((m.name, getattr(self.method_config, m.name))
                           for m in settings.fields(type(self.method_config)))
        return out

    # -- saved and read back ----------------------------------------------------------------
    def save(self, path: str) -> None:
        """JSON, written atomically: {"version": ..., "flags": `flag_values()`}."""
        files.write_json(path, {"version": CONFIG_VERSION, "flags": self.flag_values()},
                         indent=1)

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        """The config `save` wrote to `path`; a ValueError names the file when it is not one
        (or a value in it no longer passes its checks)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a uda_tf run config (unreadable JSON: {e})") \
                from None
        if not isinstance(data, dict) or not isinstance(data.get("flags"), dict):
            raise ValueError(f"{path}: not a uda_tf run config (expected a JSON object with "
                             "'version' and 'flags')")
        if data.get("version") != CONFIG_VERSION:
            raise ValueError(f"{path}: run config version {data.get('version')!r}; this "
                             f"uda_tf reads version {CONFIG_VERSION}")
        return cls._from_file(path, data["flags"])

    @classmethod
    def from_flagfile(cls, path: str) -> "RunConfig":
        """The config of a flags.cfg as train.py writes it (`--name=value`, `--flag`,
        `--noflag`; a list comma-separated): runs made before config.json existed. Flags this
        version no longer has are ignored; missing ones take their defaults."""
        declared = {f.name: f.metadata["kind"] for f in _every_setting()}
        values = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("--"):
                    continue
                name, sep, text = line[2:].partition("=")
                if not sep and declared.get(name[2:]) == "bool" and name.startswith("no"):
                    name, text = name[2:], "false"  # --noflag
                kind = declared.get(name)
                if kind == "bool":
                    values[name] = text.lower() not in ("false", "0")
                elif kind == "list":
                    values[name] = [v for v in text.split(",") if v]
                elif kind is not None and sep:
                    values[name] = text
        return cls._from_file(path, values)

    @classmethod
    def _from_file(cls, path: str, values: dict) -> "RunConfig":
        try:
            return cls.from_flags(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _every_setting() -> list[dataclasses.Field]:
    """The run's settings and every registered method's."""
    out = list(settings.fields(RunConfig))
    for method_cls in METHODS.values():
        out.extend(settings.fields(method_cls.Config))
    return out


def run_config_file(directory: str) -> str | None:
    """The file recording how a run's segmentor was built, in `directory` (a run's
    checkpoints/): config.json, else the flags.cfg of a run made before config.json existed;
    None when there is neither."""
    for name in (CONFIG_FILE, "flags.cfg"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_run_config(path: str) -> RunConfig:
    """A config.json (`RunConfig.load`) or a flags.cfg (`RunConfig.from_flagfile`)."""
    return RunConfig.load(path) if path.endswith(".json") else RunConfig.from_flagfile(path)
