"""Raw scans -> preprocessed 2D slices in sharded TFRecords plus manifest.json.

    python -m uda_tf.prepare --layout=msd --input_dir=RAW --output_dir=PREPARED
    python -m uda_tf.prepare --flagfile=configs/prepare_phantom.cfg

In Python: `uda_tf.prepare.prepare(input_dir, output_dir, layout="msd", ...)`.
The output format is specified in docs/CONTRACTS.md.
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time
import zlib
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from absl import app, flags

from uda_tf.data import layouts
from uda_tf.data import manifest as manifest_lib
from uda_tf.data import preprocess

SPLITS = manifest_lib.SPLITS
SHARDS_DIR = "shards"
# Changing any of these means the existing output is not what was asked for.
_REQUEST_KEYS = ("layout", "preprocessing", "split", "inputs", "sharding")


def parse_numbers(values, count: int, name: str, kind=float) -> tuple:
    """'2,2,2' or ['2', '2', '2'] -> (2.0, 2.0, 2.0); errors name the parameter."""
    if isinstance(values, str):
        values = values.split(",")
    try:
        numbers = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be {count} comma-separated numbers, got {values!r}"
        ) from None
    if len(numbers) != count:
        raise ValueError(f"{name} must have {count} values, got {len(numbers)}: {values!r}")
    return numbers


def check_split(fractions) -> tuple[float, float, float]:
    fractions = parse_numbers(fractions, 3, "split (train,val,test fractions)")
    if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise ValueError(
            f"split must be 3 non-negative fractions train,val,test summing to 1 with "
            f"train > 0, got {fractions}"
        )
    return fractions


def split_cases(case_ids, fractions, seed: int, domain: str) -> dict[str, list[str]]:
    """Deterministic train/val/test assignment of one domain's cases.

    Sorted ids are shuffled with a generator seeded by (seed, domain), then cut by
    largest-remainder counts; with >= 3 cases every split with a non-zero fraction gets one.
    """
    ids = sorted(case_ids)
    n = len(ids)
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:
        for i in range(3):
            if fractions[i] > 0 and counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    order = [ids[i] for i in rng.permutation(n)]
    bounds = np.cumsum([0] + counts)
    return {s: sorted(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprint(listing: layouts.Listing, cases, workers: int) -> str:
    """Hash of the selected cases' ids, domains, file contents and label names.

    File contents rather than paths or mtimes: a copied or moved dataset is still the same
    input, and no path reaches the manifest.
    """
    paths = [p for c in cases for p in (c.image_path, c.label_path) if p is not None]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        digests = dict(zip(paths, pool.map(_file_sha256, paths)))
    items = [
        [c.case_id, c.domain, digests[c.image_path], c.label_path and digests[c.label_path]]
        for c in cases
    ]
    text = json.dumps([listing.name, listing.label_names, items], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _existing_request(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, manifest_lib.FILENAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable: treat as a different request


def _pool(workers: int):
    if workers <= 1:
        return None
    # spawn, not fork: an in-process caller (the demo, tests) may already run TensorFlow
    # threads, and forking a multi-threaded process can deadlock the child.
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    )


def _remove_stale_shards(shards_dir: str, keep: set[str]) -> None:
    for path in glob.glob(os.path.join(shards_dir, "*.tfrecord*")):
        if os.path.basename(path) not in keep:
            os.remove(path)


def _write_cases(results, split_of, shards_dir, records_per_shard, spacing, total, say):
    """Writes every slice of each prepared case, one shard group per (domain, split).

    `results` must arrive grouped by (domain, split); slices keep their order.
    Returns ({case_id: manifest record}, [shard entries]).
    """
    # Imported here, not at the top: spawned workers re-import this module and need no
    # TensorFlow, and command-line flag errors come back without its start-up cost.
    from uda_tf.data import tfrecord

    case_records, shards, writer, group = {}, [], None, None

    def close_group():
        for shard in writer.close():
            shard["file"] = f"{SHARDS_DIR}/{shard['file']}"
            shards.append(dict(shard, domain=group[0], split=group[1]))

    try:
        for n, prepared in enumerate(results, 1):
            key = (prepared.domain, split_of[prepared.case_id])
            if key != group:
                if writer is not None:
                    close_group()
                group = key
                writer = tfrecord.ShardWriter(shards_dir, f"{key[0]}-{key[1]}", records_per_shard)
            depth = prepared.image.shape[2]
            for k in range(depth):
                label = None if prepared.label is None else prepared.label[:, :, k]
                writer.write(
                    tfrecord.serialize_slice(
                        prepared.image[:, :, k, None], label, prepared.case_id, prepared.domain,
                        k, depth, spacing,
                    )
                )
            case_records[prepared.case_id] = {
                "domain": prepared.domain, "split": key[1], **prepared.record
            }
            say(f"[{n}/{total}] {prepared.case_id} ({key[0]}/{key[1]}): {depth} slices")
        if writer is not None:
            close_group()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return case_records, shards


def prepare(
    input_dir: str,
    output_dir: str,
    layout: str = "msd",
    *,
    default_domain: str | None = None,
    domains=None,
    spacing=(2.0, 2.0, 2.0),
    size=(96, 112),
    clip_percentiles=(1.0, 99.0),
    normalization: str = "minmax",
    split=(0.7, 0.2, 0.1),
    split_seed: int = 0,
    records_per_shard: int = 256,
    workers: int = 2,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Prepares `input_dir` into `output_dir`; returns the manifest (see docs/CONTRACTS.md).

    If `output_dir` already holds data prepared from the same inputs with the same parameters,
    returns its manifest without redoing work; if it holds different data, raises
    FileExistsError unless `overwrite`. With workers > 1, cases are preprocessed in spawned
    processes, so a calling script needs the usual `if __name__ == "__main__":` guard.
    """
    start = time.time()
    say = functools.partial(print, flush=True) if verbose else (lambda *a, **k: None)
    config = preprocess.PreprocessConfig(
        spacing=parse_numbers(spacing, 3, "spacing"),
        size=parse_numbers(size, 2, "size", kind=int),
        clip_percentiles=parse_numbers(clip_percentiles, 2, "clip_percentiles"),
        normalization=normalization,
    )
    fractions = check_split(split)
    if int(split_seed) < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    if int(records_per_shard) < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if default_domain is not None:
        layouts.check_domain_name(default_domain, where="default_domain")

    listing = layouts.read_layout(layout, input_dir, default_domain)
    available = sorted({c.domain for c in listing.cases})
    if isinstance(domains, str):
        domains = domains.split(",")
    selected = sorted(set(domains)) if domains else available
    unknown = [d for d in selected if d not in available]
    if unknown:
        raise ValueError(
            f"domains {unknown} not found in {input_dir}; available domains: {', '.join(available)}"
        )
    cases = [c for c in listing.cases if c.domain in selected]
    splits = {
        d: split_cases([c.case_id for c in cases if c.domain == d], fractions, split_seed, d)
        for d in selected
    }
    split_of = {cid: s for d in selected for s, ids in splits[d].items() for cid in ids}

    request = {
        "layout": layout,
        "preprocessing": config.to_manifest(),
        "split": {"fractions": dict(zip(SPLITS, fractions)), "seed": int(split_seed)},
        "inputs": {
            "fingerprint": input_fingerprint(listing, cases, workers),
            "num_cases": len(cases),
            "domains": selected,
        },
        "sharding": {"records_per_shard": int(records_per_shard)},
    }
    existing = _existing_request(output_dir)
    if existing is not None:
        differing = [k for k in _REQUEST_KEYS if existing.get(k) != request[k]]
        shards_present = all(
            os.path.isfile(os.path.join(output_dir, s.get("file", "")))
            for s in existing.get("shards", [{}])
        )
        if not differing and shards_present:
            say(f"{output_dir} is already prepared with these inputs and parameters; nothing to do")
            return manifest_lib.load_manifest(output_dir)
        if not overwrite and differing:
            raise FileExistsError(
                f"{output_dir} already holds data prepared with different {', '.join(differing)}; "
                "pass --overwrite (overwrite=True) to replace it"
            )
        # From here until the new manifest lands, the directory reads as incomplete.
        os.remove(os.path.join(output_dir, manifest_lib.FILENAME))

    shards_dir = os.path.join(output_dir, SHARDS_DIR)
    os.makedirs(shards_dir, exist_ok=True)
    # Group order = write order: domain, then split, then case id.
    ordered = sorted(cases, key=lambda c: (c.domain, SPLITS.index(split_of[c.case_id]), c.case_id))
    work = functools.partial(
        preprocess.prepare_case, config=config, label_values=len(listing.label_names)
    )
    pool = _pool(int(workers))
    results = pool.map(work, ordered) if pool else map(work, ordered)
    try:
        case_records, shards = _write_cases(
            results, split_of, shards_dir, records_per_shard, config.spacing, len(ordered), say
        )
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a preprocessing worker process died (out of memory?, or prepare() called from a "
            "script without an `if __name__ == '__main__':` guard or from stdin, which spawned "
            "workers cannot re-import); retry with workers=1 (--workers=1) to see the cause"
        ) from e
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _remove_stale_shards(shards_dir, {os.path.basename(s["file"]) for s in shards})

    manifest = {
        "dataset_name": listing.name,
        **request,
        "image_shape": [*config.size, 1],
        "image_dtype": "float32",
        "num_classes": len(listing.label_names),
        "label_names": listing.label_names,
        "domains": {
            d: {
                "labelled": all(c.label_path is not None for c in cases if c.domain == d),
                "cases": splits[d],
            }
            for d in selected
        },
        "cases": dict(sorted(case_records.items())),
        "shards": shards,
    }
    manifest = manifest_lib.write_manifest(output_dir, manifest)
    say(
        f"prepared {len(cases)} cases, {sum(s['records'] for s in shards)} slices, "
        f"{len(shards)} shards in {time.time() - start:.1f} s -> {output_dir}"
    )
    return manifest


FLAGS = flags.FLAGS
_flags_defined = False


def _validator(parse):
    def check(value):
        if value is None:
            return True
        try:
            parse(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return check


def define_flags() -> None:
    """Defines the CLI flags (on first call only).

    Not at import time: other entry points import `prepare()` and may define flags with the
    same names (`--output_dir`), which absl would reject as duplicates.
    """
    global _flags_defined
    if _flags_defined:
        return
    _flags_defined = True
    flags.DEFINE_enum("layout", "msd", sorted(layouts.LAYOUTS), "Raw dataset layout.")
    flags.DEFINE_string("input_dir", None, "Raw dataset directory.")
    flags.DEFINE_string("output_dir", None, "Where shards/ and manifest.json go.")
    flags.DEFINE_string(
        "default_domain", None, "Domain of every case when the dataset names none "
        "(default: the dataset name)."
    )
    flags.DEFINE_list("domains", None, "Only prepare these domains (default: all).")
    flags.DEFINE_list("spacing", ["2", "2", "2"], "Target voxel spacing in mm (x,y,z of RAS).")
    flags.DEFINE_list("size", ["96", "112"], "In-plane slice size H,W (RAS x,y) after pad/crop.")
    flags.DEFINE_list("clip_percentiles", ["1", "99"], "Intensity clip percentiles low,high.")
    flags.DEFINE_enum(
        "normalization", "minmax", list(preprocess.NORMALIZATIONS),
        "minmax: clipped range to [0,1]; zscore: zero mean, unit std of the clipped volume.",
    )
    flags.DEFINE_list("split", ["0.7", "0.2", "0.1"], "train,val,test fractions per domain.")
    flags.DEFINE_integer("split_seed", 0, "Seed of the per-domain case shuffle.", lower_bound=0)
    flags.DEFINE_integer("records_per_shard", 256, "Slices per TFRecord shard.", lower_bound=1)
    flags.DEFINE_integer("workers", 2, "Processes preprocessing cases in parallel.", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Replace an output prepared with other parameters.")
    flags.mark_flags_as_required(["input_dir", "output_dir"])

    def config_check(**kwargs):
        return _validator(
            lambda v: preprocess.PreprocessConfig(**{k: f(v) for k, f in kwargs.items()})
        )

    flags.register_validator(
        "spacing", config_check(spacing=lambda v: parse_numbers(v, 3, "spacing"))
    )
    flags.register_validator(
        "size", config_check(size=lambda v: parse_numbers(v, 2, "size", kind=int))
    )
    flags.register_validator(
        "clip_percentiles",
        config_check(clip_percentiles=lambda v: parse_numbers(v, 2, "clip_percentiles")),
    )
    flags.register_validator("split", _validator(check_split))
    flags.register_validator(
        "default_domain",
        _validator(lambda v: layouts.check_domain_name(v, where="--default_domain")),
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        prepare(
            FLAGS.input_dir,
            FLAGS.output_dir,
            FLAGS.layout,
            default_domain=FLAGS.default_domain,
            domains=FLAGS.domains,
            spacing=FLAGS.spacing,
            size=FLAGS.size,
            clip_percentiles=FLAGS.clip_percentiles,
            normalization=FLAGS.normalization,
            split=FLAGS.split,
            split_seed=FLAGS.split_seed,
            records_per_shard=FLAGS.records_per_shard,
            workers=FLAGS.workers,
            overwrite=FLAGS.overwrite,
        )
    except (ValueError, OSError, RuntimeError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        sys.exit(1)


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
