"""`python -m uda_tf.cli.plan` (uda-plan): fingerprint a raw dataset and write the prepare
and training flagfiles that suit it and this machine; the library is uda_tf.data.plan.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from uda_tf import files
from uda_tf.cli import entry

FLAGS = flags.FLAGS
OUTPUTS = ("plan.json", "prepare.cfg", "train.cfg")


def define_flags():
    from uda_tf.cli.prepare_flags import define_layout_option_flags
    from uda_tf.data.layouts import LAYOUTS
    flags.DEFINE_string("data_dir", None, "A prepared dataset (manifest.json) to plan the "
                        "training of, instead of a raw one (--layout, --input_dir).")
    flags.DEFINE_enum("layout", None, sorted(LAYOUTS), "Raw dataset layout (as prepare's).")
    flags.DEFINE_string("input_dir", None, "Raw dataset directory (read only).")
    flags.DEFINE_string("default_domain", None, "Domain of every case when the layout names "
                        "none (as prepare's).")
    define_layout_option_flags()  # --image_glob ... as prepare takes them
    flags.DEFINE_string("source_domain", None, "Labelled domain to train on (default: the "
                        "domain with the most labelled cases).")
    flags.DEFINE_string("target_domain", None, "Unlabelled domain to adapt to (default: the "
                        "other domain when there are exactly two; none: source only).")
    flags.DEFINE_enum("dims", "2", ["2", "3"], "Plan 2D slices (unet2d) or 3D volumes (unet3d).")
    flags.DEFINE_integer("unet_depth", 3, "Times the U-Net halves its input: sizes are "
                         "rounded up to multiples of 2^depth.", lower_bound=1, upper_bound=6)
    flags.DEFINE_integer("intensity_cases", 4, "Cases per domain whose voxels are read for "
                         "the intensity statistics (the geometry comes from every header).",
                         lower_bound=1)
    flags.DEFINE_string("output_dir", None, "Where plan.json, prepare.cfg and train.cfg go.")
    flags.DEFINE_string("prepared_dir", None, "Where prepare.cfg makes prepare write (default: "
                        "<output_dir>/prepared); train.cfg reads it.")
    flags.DEFINE_string("runs_dir", None, "train.cfg's --output_dir (default: "
                        "<output_dir>/runs).")
    flags.DEFINE_bool("overwrite", False, "Replace plan.json, prepare.cfg and train.cfg "
                      "when --output_dir has them.")
    flags.mark_flags_as_required(["output_dir"])


def _default_domains(fp: dict) -> tuple[str, str | None]:
    domains = fp["domains"]
    # the most labelled cases; on a tie the first in name order
    source = FLAGS.source_domain or max(domains, key=lambda d: domains[d]["labelled"])
    target = FLAGS.target_domain
    if target is None and len(domains) == 2:
        target = next(d for d in domains if d != source)
    return source, target


def report(fp: dict, plan: dict) -> str:
    """The fingerprint of a raw dataset as a table, then `suggestions(plan)`."""
    lines = [f"dataset {fp['dataset']}: {len(fp['cases'])} cases, classes "
             f"{', '.join(fp['label_names'].values())}", "",
             f"{'domain':<16}{'cases':>6}{'labelled':>9}  {'median spacing (mm, RAS)':<26}"
             f"{'median shape':<18}{'intensity p0.5 / p50 / p99.5':<30}"]
    for name, d in fp["domains"].items():
        spacing = "x".join(f"{v:.3g}" for v in d["spacing_median"])
        shape = "x".join(map(str, d["shape_median"]))
        i = d["intensity"]
        lines.append(f"{name:<16}{d['cases']:>6}{d['labelled']:>9}  {spacing:<26}{shape:<18}"
                     f"{i['p0.5']:.4g} / {i['p50']:.4g} / {i['p99.5']:.4g}")
    return "\n".join(lines + suggestions(plan))


def suggestions(plan: dict) -> list[str]:
    """Every suggested flag with its reason, then the warnings."""
    lines = ["", "suggested settings:"]
    for group in ("prepare", "train"):
        for name, value in plan[group].items():
            why = f"  ({plan['reasons'][name]})" if name in plan["reasons"] else ""
            lines.append(f"  {group:<8} --{name}={value}{why}")
    return lines + [f"  warning: {w}" for w in plan["warnings"]]


def write_plan(out: str, plan_json: dict, configs: dict) -> None:
    """plan.json and each flagfile of `configs` {file name: (command, {flag: value})} in
    `out`, every file written whole or not at all."""
    from uda_tf.cli.train import flagfile_text
    os.makedirs(out, exist_ok=True)
    files.write_json(os.path.join(out, "plan.json"), plan_json, indent=1)
    for name, (command, values) in configs.items():
        path = os.path.join(out, name)
        with files.atomic_write(path) as f:
            f.write(flagfile_text(values, f"{command} --flagfile={path}   (written by python "
                                          "-m uda_tf.cli.plan)"))


def _train_values(data_dir: str, out: str, suggestion: dict, dataset: str) -> dict:
    runs = os.path.abspath(FLAGS.runs_dir or os.path.join(out, "runs"))
    return {"data_dir": data_dir, **suggestion["train"], "output_dir": runs,
            "mlflow_experiment": re.sub(r"[^\w.-]+", "_", dataset) or "uda_tf"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.data_dir) == bool(FLAGS.layout or FLAGS.input_dir):
        raise app.UsageError("plan a raw dataset (--layout and --input_dir) or a prepared one "
                             "(--data_dir), one of the two")
    if not FLAGS.data_dir and not (FLAGS.layout and FLAGS.input_dir):
        raise app.UsageError("a raw dataset needs both --layout and --input_dir")
    from uda_tf.cli.prepare_flags import layout_options_from_flags
    from uda_tf.data import layouts, plan
    out = os.path.abspath(FLAGS.output_dir)
    existing = [n for n in OUTPUTS if os.path.exists(os.path.join(out, n))]
    if existing and not FLAGS.overwrite:
        raise SystemExit(f"plan: error: {out} already has {', '.join(existing)}; choose "
                         "another --output_dir or pass --overwrite")
    if FLAGS.data_dir:
        return plan_prepared(out)
    options = layout_options_from_flags()
    try:
        listing = layouts.read_layout(FLAGS.layout, FLAGS.input_dir, FLAGS.default_domain,
                                      **options)
        fp = plan.fingerprint(listing, intensity_cases=FLAGS.intensity_cases)
        source, target = _default_domains(fp)
        gpus = _gpus()
        suggestion = plan.suggest(fp, source=source, target=target, dims=int(FLAGS.dims),
                                  unet_depth=FLAGS.unet_depth, gpus=gpus)
    except (ValueError, OSError) as e:
        raise SystemExit(f"plan: error: {e}") from None
    prepared = os.path.abspath(FLAGS.prepared_dir or os.path.join(out, "prepared"))
    domains = [source] + ([target] if target else [])
    prepare_cfg = {"layout": FLAGS.layout, "input_dir": os.path.abspath(FLAGS.input_dir),
                   **({"default_domain": FLAGS.default_domain} if FLAGS.default_domain
                      else {}),
                   **options, "output_dir": prepared, "domains": ",".join(domains),
                   **suggestion["prepare"]}
    write_plan(out, {"fingerprint": fp, "machine": {"gpus": gpus}, "plan": suggestion,
                     "source_domain": source, "target_domain": target}, {
        "prepare.cfg": ("python -m uda_tf.cli.prepare", prepare_cfg),
        "train.cfg": ("python train.py --method=<method>",
                      _train_values(prepared, out, suggestion, fp["dataset"]))})
    print(report(fp, suggestion))
    print(f"\nwrote {out}/plan.json, prepare.cfg and train.cfg; next:\n"
          f"  python -m uda_tf.cli.prepare --flagfile={out}/prepare.cfg\n"
          f"  python train.py --flagfile={out}/train.cfg --method=source_only   "
          "(then e.g. --method=grl)")


def plan_prepared(out: str) -> None:
    """--data_dir: the training settings of a prepared dataset, as train.cfg (and plan.json)."""
    from uda_tf.data import plan
    from uda_tf.data.manifest import load_manifest
    try:
        manifest = load_manifest(FLAGS.data_dir)
        fp = plan.prepared_fingerprint(manifest)
        source, target = _default_domains({"domains": {
            d: {"labelled": v["labelled_train"]} for d, v in fp["domains"].items()}})
        gpus = _gpus()
        suggestion = plan.suggest_for_prepared(fp, source=source, target=target,
                                               unet_depth=FLAGS.unet_depth, gpus=gpus)
    except (ValueError, OSError) as e:
        raise SystemExit(f"plan: error: {e}") from None
    write_plan(out, {"fingerprint": fp, "machine": {"gpus": gpus}, "plan": suggestion,
                     "source_domain": source, "target_domain": target}, {
        "train.cfg": ("python train.py --method=<method>", _train_values(
            os.path.abspath(FLAGS.data_dir), out, suggestion, fp["dataset"]))})
    lines = [f"prepared dataset {fp['dataset']}: {fp['record_kind']} of {fp['image_shape']}, "
             f"spacing {fp['spacing']}", "",
             f"{'domain':<16}{'cases':>6}{'labelled':>9}{'train records':>15}"]
    for name, d in fp["domains"].items():
        lines.append(f"{name:<16}{d['cases']:>6}{d['labelled']:>9}{d['train_records']:>15}")
    print("\n".join(lines + suggestions(suggestion)))
    print(f"\nwrote {out}/plan.json and train.cfg; next:\n"
          f"  python train.py --flagfile={out}/train.cfg --method=source_only")


def _gpus() -> int:
    import tensorflow as tf
    return len(tf.config.list_physical_devices("GPU"))


# --help's groups (title, first flag); the flags are defined in this order.
HELP_SECTIONS = (("input: a prepared dataset, or a raw one as prepare reads it", "data_dir"),
                 ("layout options (only where the layout takes them)", "image_glob"),
                 ("what to plan", "source_domain"), ("output", "output_dir"))

ABOUT = """Look at a raw dataset before preparing it (voxel spacing, image sizes, intensity
statistics per domain, from the headers and a few cases) and write the prepare and training
flagfiles that suit it and this machine: median spacing, a size that fits every case, the
slice axis, intensity normalisation, batch size and training length, each with its reason.
Target labels are never read. With --data_dir, plans the training of an already prepared
dataset (train.cfg only).

example: python -m uda_tf.cli.plan --layout=msd --input_dir=/data/MyDataset \\
           --output_dir=/data/my_plan"""


def run():
    entry.run(main, define_flags, ABOUT, sections=HELP_SECTIONS)


if __name__ == "__main__":
    sys.exit(run())
