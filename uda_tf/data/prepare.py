"""Raw scans -> preprocessed 2D slices or 3D volumes in sharded TFRecords plus manifest.json.

    python -m uda_tf.cli.prepare --layout=msd --input_dir=RAW --output_dir=PREPARED
    python -m uda_tf.cli.prepare --layout=cc359 --input_dir=CC359 --output_dir=OUT --spacing=1,1,1
    python -m uda_tf.cli.prepare --flagfile=<plan>/prepare.cfg   (written by uda_tf.cli.plan)

In Python: `uda_tf.data.prepare.prepare(input_dir, output_dir, layout="msd", ...)`.
Cases are preprocessed in parallel processes (a text progress bar on stderr); every shard is
written under a temporary name, renamed, and marked complete, so an interrupted run re-run with
the same arguments keeps the finished shards and ends with the same shards and manifest as an
uninterrupted run (uda_tf/data/sharding.py). `manifest.json` is written last.
The output format is specified in docs/CONTRACTS.md; the flags are in uda_tf/cli/prepare_flags.py.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool


from uda_tf import files
from uda_tf.data import io, layouts
from uda_tf.data import manifest as manifest_lib
from uda_tf.data import preprocess, sharding, splits
from uda_tf.data.progress import Progress

SPLITS = manifest_lib.SPLITS
SHARDS_DIR = sharding.SHARDS_DIR
OUTPUTS = ("slices", "volumes")
SKIPPED_FILE = "skipped_cases.json"
split_cases = splits.split_cases  # kept importable from here
# Changing any of these means the existing output is not what was asked for.
_REQUEST_KEYS = ("layout", "layout_options", "preprocessing", "output", "split", "inputs",
                 "sharding", "skip_bad_cases", "identifiers")


def parse_numbers(values, count, name: str, kind=float) -> tuple:
    """'2,2,2' or ['2', '2', '2'] -> (2.0, 2.0, 2.0); errors name the parameter. `count` may
    be a tuple of allowed counts."""
    if isinstance(values, str):
        values = values.split(",")
    counts = count if isinstance(count, tuple) else (count,)
    try:
        numbers = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be {' or '.join(map(str, counts))} comma-separated numbers, "
            f"got {values!r}") from None
    if len(numbers) not in counts:
        raise ValueError(f"{name} must have {' or '.join(map(str, counts))} values, "
                         f"got {len(numbers)}: {values!r}")
    return numbers


def check_split(fractions) -> tuple[float, float, float]:
    fractions = parse_numbers(fractions, 3, "split (train,val,test fractions)")
    if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise ValueError(
            f"split must be 3 non-negative fractions train,val,test summing to 1 with "
            f"train > 0, got {fractions}"
        )
    return fractions


def input_fingerprint(listing: layouts.Listing, cases, workers: int, problems=()) -> str:
    """Hash of the selected cases' ids, domains, file contents and label names.

    File contents rather than paths or mtimes: a copied or moved dataset is still the same
    input, and no path reaches the manifest.
    """
    paths = sorted({p for c in cases
                    for p in (*c.image_paths, c.label_path, c.mask_path) if p})
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        digests = dict(zip(paths, pool.map(sharding.file_sha256, paths)))
    items = [
        [c.case_id, c.domain, digests[c.image_path], c.label_path and digests[c.label_path]]
        # A binarized label without a mask (CC-359, STARE) has no mask digest: None stands in.
        + ([c.mask_path and digests[c.mask_path], c.binarize_label]
           if c.mask_path or c.binarize_label else [])
        + ([[digests[p] for p in c.channel_paths]] if c.channel_paths else [])
        for c in cases
    ]
    items += [[p.case_id, p.domain, "problem", p.reason] for p in problems]
    text = json.dumps([listing.name, listing.label_names, items], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _existing_request(output_dir: str) -> dict | None:
    """The request keys of an existing manifest. One written before the optional steps
    existed gets the values those versions used implicitly, so data prepared by them with the
    same parameters is recognised instead of refused."""
    path = os.path.join(output_dir, manifest_lib.FILENAME)
    if not os.path.exists(path):
        return None
    existing = sharding.read_json(path)
    if not isinstance(existing, dict) or "preprocessing" not in existing:
        return {}  # unreadable: treat as a different request
    try:
        return _upgraded_request(existing)
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}  # damaged: a different request (refused without --overwrite)


def _upgraded_request(existing: dict) -> dict:
    if "output" not in existing:
        existing = dict(existing)
        existing.setdefault("layout_options", {})
        existing.setdefault("skip_bad_cases", False)
        existing["output"] = {"records": "slices", "context_slices": 0,
                              "image_dtype": existing.get("image_dtype", "float32"),
                              "compression": None}
        existing["split"] = {"file_sha256": None, **existing.get("split", {})}
        # fills the preprocessing keys added since (their defaults)
        config = preprocess.PreprocessConfig.from_manifest(existing["preprocessing"])
        existing["preprocessing"] = config.to_manifest()
    return existing


def _pool(workers: int):
    if workers <= 1:
        return None
    # spawn, not fork: an in-process caller (the demo, tests) may already run TensorFlow
    # threads, and forking a multi-threaded process can deadlock the child.
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    )


def _prepare_or_error(case, config, label_values, channels, image_dtype,
                      max_voxels=io.MAX_VOXELS):
    """(PreparedCase, None), or (None, the exception) for a bad case; runs in workers."""
    if isinstance(case, layouts.CaseProblem):
        return None, layouts.LayoutError(case.reason)
    try:
        prepared = preprocess.prepare_case(case, config, label_values, max_voxels=max_voxels)
    except (ValueError, OSError) as e:  # NiftiError, FileNotFoundError, unreadable files
        return None, e
    got = prepared.image.shape[3] if prepared.image.ndim == 4 else 1
    if got != channels:
        return None, io.NiftiError(f"image {case.image_path} gives {got} channels, the dataset "
                                   f"{channels} (mixed pictures and scans, or --color?)")
    # Halves what goes back through the pipe when float16 is stored anyway.
    prepared.image = prepared.image.astype(image_dtype, copy=False)
    return prepared, None


def _in_order(pool, fn, items, window: int):
    """fn(item) for each item, in order, with at most `window` in flight: memory is bounded by
    the window, not by the dataset (pool.map would queue every result)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending = collections.deque()
    items = iter(items)
    for item in itertools.islice(items, window):
        pending.append(pool.submit(fn, item))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(items, 1):
            pending.append(pool.submit(fn, item))
        yield result


def case_records(prepared: preprocess.PreparedCase, output: str, context_slices: int,
                 image_dtype: str):
    """The serialized records of one prepared case, in shard order."""
    from uda_tf.data import tfrecord  # TensorFlow only in the main process (see below)

    spacing = prepared.record["prepared_spacing"]
    if output == "volumes":
        image = prepared.image if prepared.image.ndim == 4 else prepared.image[..., None]
        yield tfrecord.serialize_volume(
            image, prepared.label, prepared.case_id, prepared.domain, spacing,
            pad_value=prepared.record["crop_pad"]["pad_value"], image_dtype=image_dtype,
            roi=prepared.roi)
        return
    slices = preprocess.slices_with_context(prepared.image, context_slices)
    depth = len(slices)
    for k in range(depth):
        yield tfrecord.serialize_slice(
            slices[k], None if prepared.label is None else prepared.label[:, :, k],
            prepared.case_id, prepared.domain, k, depth, spacing, image_dtype=image_dtype,
            roi=None if prepared.roi is None else prepared.roi[:, :, k])


def _start_progress_dir(output_dir: str, request_id: str, say) -> None:
    """Keeps an interrupted run's progress only if it was for this very request."""
    progress_dir = os.path.join(output_dir, sharding.PROGRESS_DIR)
    marker = os.path.join(progress_dir, "request.json")
    previous = sharding.read_json(marker)
    if previous is not None and previous.get("request") != request_id:
        say("discarding the progress of an interrupted run with other inputs or parameters")
        sharding.remove_progress(output_dir)
    elif previous is not None:
        say(f"resuming an interrupted run in {output_dir}")
    os.makedirs(progress_dir, exist_ok=True)
    sharding.remove_temporary_files(output_dir)
    sharding.write_json_atomic(marker, {"request": request_id})


def _write_groups(groups, request: PrepareRequest, selection: _Selection, request_id: str):
    """Writes every (domain, split) group; returns their finished GroupWriters in order."""
    writers = {key: sharding.GroupWriter(request.output_dir, f"{key[0]}-{key[1]}",
                                         request.records_per_shard, request_id,
                                         compression=request.compression)
               for key in groups}
    work = _remaining_work(groups, writers, request.say)
    progress = Progress(len(work), enabled=request.show_progress)
    fn = functools.partial(_prepare_or_error, config=request.config,
                           label_values=len(selection.listing.label_names),
                           channels=selection.channels, image_dtype=request.image_dtype,
                           max_voxels=request.max_voxels)
    original_ids = (None if selection.mapping is None
                    else {k: v["case_id"] for k, v in selection.mapping.items()})
    pool = _pool(request.workers)
    remaining = collections.Counter(key for key, *_ in work)
    current = None
    try:
        results = _in_order(pool, fn, [case for _, _, case, _ in work], 2 * request.workers)
        for (key, position, case, first), (prepared, error) in zip(work, results):
            current = writers[key]
            if error is not None:
                _skip_case(current, key[1], case, error, request.skip_bad_cases, original_ids)
                note = f"skipped {case.case_id}"
            else:
                records = case_records(prepared, request.output, request.context_slices,
                                       request.image_dtype)
                for offset, record in itertools.islice(enumerate(records), first, None):
                    current.write(record, position, offset)
                current.case_done(position, case.case_id,
                                  {"domain": key[0], "split": key[1], **prepared.record})
                note = case.case_id
            remaining[key] -= 1
            if remaining[key] == 0:
                current.finish(len(groups[key]))
            progress.update(note=note)
        for key, writer in writers.items():  # groups resumed at their very end
            if not writer.complete:
                writer.finish(len(groups[key]))
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a preprocessing worker process died (out of memory?, or prepare() called from a "
            "script without an `if __name__ == '__main__':` guard or from stdin, which spawned "
            "workers cannot re-import); retry with workers=1 (--workers=1) to see the cause"
        ) from e
    finally:
        if current is not None:
            current.abort()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return list(writers.values())


def _remaining_work(groups, writers, say) -> list:
    """(group key, position, case, first record to write) of every case that is not yet in a
    finished shard, in write order."""
    work = []
    for key, members in groups.items():
        writer = writers[key]
        if writer.complete:
            continue
        start, offset = writer.resume
        work += [(key, p, members[p], offset if p == start else 0)
                 for p in range(start, len(members))]
    resumed = sum(len(m) for m in groups.values()) - len(work)
    if resumed:
        say(f"{resumed} cases are already in finished shards; preparing {len(work)}")
    return work


def _skip_case(writer, split: str, case, error, skip_bad_cases: bool, original_ids) -> None:
    """Records a case that failed as skipped, or raises its error (no skip_bad_cases). With
    derived ids the reason is scrubbed of the original ones."""
    if not skip_bad_cases:
        raise error
    reason = str(error)
    if original_ids is not None:
        from uda_tf.data.privacy import scrub
        reason = scrub(reason, case, original_ids[case.case_id], case.case_id)
    writer.case_skipped({"case_id": case.case_id, "domain": case.domain, "split": split,
                         "error": type(error).__name__, "reason": reason})


def _remove_stale_shards(output_dir: str, keep: set[str], ours: set[str]) -> None:
    """Removes shards of earlier requests that this one did not write again: in a directory
    prepare created, every `*.tfrecord` under shards/; in one a user pointed --output_dir at,
    only the shards an earlier manifest or progress marker lists (`ours`), never a file of
    theirs that happens to sit in a shards/ folder there."""
    shards_dir = os.path.join(output_dir, SHARDS_DIR)
    if files.created_by_us(output_dir):
        ours = ours | {os.path.basename(p) for p in
                       glob.glob(os.path.join(shards_dir, "*.tfrecord*"))}
    for name in sorted(ours - keep):
        path = os.path.join(shards_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


@dataclasses.dataclass(frozen=True)
class PrepareRequest:
    """The arguments of one `prepare` call, checked and normalised once (`from_arguments`);
    every later step reads them here instead of receiving them keyword by keyword."""

    input_dir: str
    output_dir: str
    layout: str
    layout_options: dict  # without the options given as None
    default_domain: str | None
    domains: list | None  # sorted; None: every domain the layout finds
    config: preprocess.PreprocessConfig
    fractions: tuple  # train, val, test
    split_seed: int
    split_file: str | None
    output: str  # one of OUTPUTS
    context_slices: int
    image_dtype: str
    compression: str  # "" or "GZIP"
    records_per_shard: int
    workers: int
    skip_bad_cases: bool
    overwrite: bool
    keep_identifiers: bool
    identifier_map: str | None
    max_voxels: int
    verbose: bool
    show_progress: bool

    @classmethod
    def from_arguments(cls, input_dir, output_dir, layout, *, default_domain, domains, spacing,
                       size, clip_percentiles, normalization, image_interpolation, slice_axis,
                       foreground, foreground_percentile, normalize_in_foreground,
                       crop_foreground, color, output, context_slices, image_dtype,
                       compression, split, split_seed, split_file, records_per_shard, workers,
                       skip_bad_cases, overwrite, verbose, progress, layout_options,
                       keep_identifiers, identifier_map, max_voxels) -> PrepareRequest:
        """`prepare`'s arguments, or ValueError naming the one that is out of range."""
        config = preprocess.PreprocessConfig(
            spacing=parse_numbers(spacing, 3, "spacing"),
            size=parse_numbers(size, (2, 3), "size", kind=int),
            clip_percentiles=parse_numbers(clip_percentiles, 2, "clip_percentiles"),
            normalization=normalization, image_interpolation=image_interpolation,
            slice_axis=slice_axis, foreground=foreground,
            foreground_percentile=float(foreground_percentile),
            normalize_in_foreground=bool(normalize_in_foreground),
            crop_foreground=bool(crop_foreground), color=color,
        )
        fractions = check_split(split)
        compression = (compression or "").upper()
        if compression in ("NONE", ""):
            compression = ""
        _check_ranges(split_seed=split_seed, records_per_shard=records_per_shard,
                      workers=workers, output=output, context_slices=context_slices,
                      image_dtype=image_dtype, compression=compression, max_voxels=max_voxels)
        if default_domain is not None:
            layouts.check_domain_name(default_domain, where="default_domain")
        if isinstance(domains, str):
            domains = domains.split(",")
        return cls(
            input_dir=input_dir, output_dir=output_dir, layout=layout,
            layout_options={k: v for k, v in (layout_options or {}).items() if v is not None},
            default_domain=default_domain, domains=sorted(set(domains)) if domains else None,
            config=config, fractions=fractions, split_seed=int(split_seed),
            split_file=split_file, output=output, context_slices=int(context_slices),
            image_dtype=image_dtype, compression=compression,
            records_per_shard=int(records_per_shard or (256 if output == "slices" else 4)),
            workers=int(workers), skip_bad_cases=bool(skip_bad_cases), overwrite=overwrite,
            keep_identifiers=keep_identifiers, identifier_map=identifier_map,
            max_voxels=io.MAX_VOXELS if max_voxels is None else int(max_voxels),
            verbose=verbose, show_progress=verbose if progress is None else progress)

    def say(self, *message) -> None:
        if self.verbose:
            print(*message, flush=True)


def _check_ranges(*, split_seed, records_per_shard, workers, output, context_slices,
                  image_dtype, compression, max_voxels) -> None:
    checks = [
        (int(split_seed) >= 0, f"split_seed must be >= 0, got {split_seed}"),
        (records_per_shard is None or int(records_per_shard) >= 1,
         f"records_per_shard must be >= 1, got {records_per_shard}"),
        (int(workers) >= 1, f"workers must be >= 1, got {workers}"),
        (output in OUTPUTS, f"output must be one of {', '.join(OUTPUTS)}, got {output!r}"),
        (int(context_slices) >= 0, f"context_slices must be >= 0, got {context_slices}"),
        (output == "slices" or int(context_slices) == 0,
         "context_slices applies to output=slices only"),
        (image_dtype in ("float32", "float16"),
         f"image_dtype must be float32 or float16, got {image_dtype!r}"),
        (compression in ("", "GZIP"), f"compression must be none or gzip, got {compression!r}"),
        (max_voxels is None or int(max_voxels) >= 1,
         f"max_voxels must be >= 1, got {max_voxels}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class _Selection:
    """What `prepare` takes from the input: the selected domains' cases and their splits."""

    listing: layouts.Listing
    selected: list  # domain names, sorted
    cases: list
    problems: list  # CaseProblems: they take part in the split, and are skipped or refused
    assigned: dict  # {domain: {split: [case ids]}}
    channels: int
    mapping: dict | None  # {derived id: original identifiers} when ids are derived

    @property
    def split_of(self) -> dict:
        return {cid: s for d in self.assigned for s, ids in self.assigned[d].items()
                for cid in ids}


def _select_cases(request: PrepareRequest) -> _Selection:
    """Reads the layout, keeps the requested domains and assigns every case its split."""
    listing = layouts.read_layout(request.layout, request.input_dir, request.default_domain,
                                  skip_bad_cases=request.skip_bad_cases,
                                  **request.layout_options)
    available = sorted({c.domain for c in listing.cases} | {p.domain for p in listing.problems})
    selected = request.domains or available
    unknown = [d for d in selected if d not in available]
    if unknown:
        raise ValueError(
            f"domains {unknown} not found in {request.input_dir}; available domains: "
            f"{', '.join(available)}"
        )
    cases = [c for c in listing.cases if c.domain in selected]
    problems = [p for p in listing.problems if p.domain in selected]
    assigned = _assign_splits(request, listing, cases, problems)
    mapping = None
    if not request.keep_identifiers:  # after the split: it is drawn from the original ids
        from uda_tf.data import privacy
        privacy.check_map_path(request.identifier_map, request.output_dir)
        cases, problems, assigned, mapping = privacy.pseudonymize(cases, problems, assigned)
    channels = (3 if request.config.color == "rgb"
                and any(io.is_picture(c.image_path) for c in cases)
                else max((len(c.image_paths) for c in cases), default=1))
    return _Selection(listing, selected, cases, problems, assigned, channels, mapping)


def _assign_splits(request: PrepareRequest, listing, cases, problems) -> dict:
    # Problem cases take part in the split (they were meant to be labelled cases), so which
    # case lands where does not depend on which ones turn out broken.
    members = collections.defaultdict(list)
    for c in cases:
        members[c.domain].append((c.case_id, c.label_path is not None))
    for p in problems:
        members[p.domain].append((p.case_id, True))
    split_file = request.split_file
    split_assignments = None
    if split_file:
        split_assignments = splits.read_split_file(split_file)
        splits.check_known(
            split_assignments,
            {c.case_id for c in listing.cases} | {p.case_id for p in listing.problems},
            f"--split_file={split_file}", f"{request.input_dir} (layout {request.layout!r})")
    return splits.assign_splits(members, request.fractions, request.split_seed,
                                split_assignments, where=f"--split_file={split_file}")


def _recorded_request(request: PrepareRequest, selection: _Selection) -> dict:
    """The `_REQUEST_KEYS` the manifest records; their hash is the request id."""
    recorded = {
        "layout": request.layout,
        "layout_options": request.layout_options,
        "preprocessing": request.config.to_manifest(),
        "output": {"records": request.output, "context_slices": request.context_slices,
                   "image_dtype": request.image_dtype,
                   "compression": request.compression or None},
        "split": {"fractions": dict(zip(SPLITS, request.fractions)), "seed": request.split_seed,
                  "file_sha256": sharding.file_sha256(request.split_file)
                  if request.split_file else None},
        "inputs": {
            "fingerprint": input_fingerprint(selection.listing, selection.cases,
                                             request.workers, selection.problems),
            "num_cases": len(selection.cases) + len(selection.problems),
            "domains": selection.selected,
        },
        "sharding": {"records_per_shard": request.records_per_shard},
        "skip_bad_cases": request.skip_bad_cases,
    }
    if not request.keep_identifiers:  # absent when kept, so earlier manifests still match
        recorded["identifiers"] = "derived"
    return recorded


def prepare(
    input_dir: str,
    output_dir: str,
    layout: str = "msd",
    *,
    default_domain: str | None = None, domains=None,
    spacing=(2.0, 2.0, 2.0), size=(96, 112), clip_percentiles=(1.0, 99.0),
    normalization: str = "minmax", image_interpolation: str = "linear",
    slice_axis: str = "axial", foreground: str = "nonzero", foreground_percentile: float = 5.0,
    normalize_in_foreground: bool = False, crop_foreground: bool = False, color: str = "green",
    output: str = "slices", context_slices: int = 0, image_dtype: str = "float32",
    compression: str | None = None,
    split=(0.7, 0.2, 0.1), split_seed: int = 0, split_file: str | None = None,
    records_per_shard: int | None = None, workers: int = 2, skip_bad_cases: bool = False,
    overwrite: bool = False, verbose: bool = True, progress: bool | None = None,
    layout_options: dict | None = None, keep_identifiers: bool = True,
    identifier_map: str | None = None, max_voxels: int | None = None,
) -> dict:
    """Prepares `input_dir` into `output_dir`; returns the manifest (see docs/CONTRACTS.md).

    If `output_dir` already holds data prepared from the same inputs with the same parameters,
    returns its manifest without redoing work; if it holds different data, raises
    FileExistsError unless `overwrite`. An interrupted run's finished shards are kept and the
    rest is prepared (same arguments). With workers > 1, cases are preprocessed in spawned
    processes, so a calling script needs the usual `if __name__ == "__main__":` guard.
    `records_per_shard` defaults to 256 slices or 4 volumes. `layout_options` go to the layout
    reader (e.g. {"image_glob": ...} for layout "glob").
    `keep_identifiers=False` (the CLI's default) replaces case ids and file paths by derived
    ids (uda_tf/data/privacy.py); `identifier_map` then receives the mapping back.
    `max_voxels` (default io.MAX_VOXELS) bounds the voxels a scan's header may declare; it is
    checked before any voxel is read, so a forged or huge header cannot exhaust memory.
    One `prepare` at a time writes `output_dir` (files.OutputLock); a second is refused.
    """
    start = time.time()
    request = PrepareRequest.from_arguments(
        input_dir, output_dir, layout, default_domain=default_domain, domains=domains,
        spacing=spacing, size=size, clip_percentiles=clip_percentiles,
        normalization=normalization, image_interpolation=image_interpolation,
        slice_axis=slice_axis, foreground=foreground,
        foreground_percentile=foreground_percentile,
        normalize_in_foreground=normalize_in_foreground, crop_foreground=crop_foreground,
        color=color, output=output, context_slices=context_slices, image_dtype=image_dtype,
        compression=compression, split=split, split_seed=split_seed, split_file=split_file,
        records_per_shard=records_per_shard, workers=workers, skip_bad_cases=skip_bad_cases,
        overwrite=overwrite, verbose=verbose, progress=progress, layout_options=layout_options,
        keep_identifiers=keep_identifiers, identifier_map=identifier_map, max_voxels=max_voxels)
    selection = _select_cases(request)
    recorded = _recorded_request(request, selection)
    # From here on prepare writes: one writer per output directory.
    created = not os.path.exists(output_dir)
    with files.OutputLock(output_dir, "prepare --output_dir"):
        if created:
            files.mark_created(output_dir, "prepared dataset")
        return _prepare_locked(request, selection, recorded, start)


def _prepare_locked(request: PrepareRequest, selection: _Selection, recorded: dict,
                    start: float) -> dict:
    """The writing part of `prepare`, under the output lock."""
    output_dir = request.output_dir
    previous = _previous_manifest(output_dir)
    manifest = _reuse_or_clear(request, recorded)
    if manifest is not None:
        return manifest
    ours = sharding.marked_shards(output_dir, previous)
    request_id = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()
    _start_progress_dir(output_dir, request_id, request.say)
    # Group order = write order: domain, then split, then case id.
    by_id = {c.case_id: c for c in selection.cases} | {p.case_id: p for p in selection.problems}
    split_order = (*SPLITS, splits.UNLABELLED)
    groups = {(d, s): [by_id[c] for c in selection.assigned[d][s]]
              for d in selection.selected for s in split_order if selection.assigned[d].get(s)}
    writers = _write_groups(groups, request, selection, request_id)

    shards = [{k: s[k] for k in ("file", "records", "sha256")} | {"domain": d, "split": sp}
              for (d, sp), w in zip(groups, writers) for s in w.shards]
    case_entries = {cid: r for w in writers for cid, r in w.cases.items()}
    skipped = sorted((e for w in writers for e in w.skipped), key=lambda e: e["case_id"])
    _remove_stale_shards(output_dir, {os.path.basename(s["file"]) for s in shards}, ours)
    if request.skip_bad_cases:
        sharding.write_json_atomic(os.path.join(output_dir, SKIPPED_FILE), skipped)
    manifest = manifest_lib.write_manifest(
        output_dir, _manifest(request, selection, recorded, case_entries, skipped, shards))
    if selection.mapping is not None and request.identifier_map:
        os.makedirs(os.path.dirname(os.path.abspath(request.identifier_map)), exist_ok=True)
        sharding.write_json_atomic(request.identifier_map, selection.mapping)
    sharding.remove_progress(output_dir)
    request.say(
        f"prepared {len(case_entries)} cases, {sum(s['records'] for s in shards)} "
        f"{request.output}, {len(shards)} shards in {time.time() - start:.1f} s -> {output_dir}"
        + (f"; skipped {len(skipped)} bad cases (see {SKIPPED_FILE})" if skipped else "")
    )
    return manifest


def _previous_manifest(output_dir: str):
    """The manifest already in `output_dir` (None if absent; whatever JSON it holds
    otherwise), refused if prepare may not replace it."""
    manifest_path = os.path.join(output_dir, manifest_lib.FILENAME)
    previous = sharding.read_json(manifest_path) if os.path.exists(manifest_path) else None
    if os.path.exists(manifest_path) and not files.created_by_us(output_dir) and not (
            isinstance(previous, dict) and previous.get("format") == manifest_lib.FORMAT):
        # Not ours (or unreadable, in a directory prepare did not create): never replaced,
        # --overwrite or not.
        raise FileExistsError(
            f"{manifest_path} exists but is not a uda_tf manifest; prepare will not replace "
            "it. Choose another --output_dir or move the file away")
    return previous


def _reuse_or_clear(request: PrepareRequest, recorded: dict) -> dict | None:
    """The existing manifest if it was prepared for this very request and is whole; else
    None, the existing manifest removed (refused without `overwrite` if its request
    differs)."""
    output_dir = request.output_dir
    existing = _existing_request(output_dir)
    if existing is None:
        return None
    differing = [k for k in _REQUEST_KEYS if existing.get(k) != recorded.get(k)]
    shards_present = not differing and isinstance(existing.get("shards"), list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str)
        and os.path.isfile(os.path.join(output_dir, s["file"]))
        for s in existing["shards"])
    if not differing and shards_present:
        try:
            manifest = manifest_lib.load_manifest(output_dir)
        except manifest_lib.ManifestError as e:
            if not request.overwrite:
                raise
            request.say(f"replacing a damaged manifest ({e})")
        else:
            request.say(f"{output_dir} is already prepared with these inputs and parameters; "
                        "nothing to do")
            return manifest
    if not request.overwrite and differing:
        raise FileExistsError(
            f"{output_dir} already holds data prepared with different {', '.join(differing)}; "
            "pass --overwrite (overwrite=True) to replace it"
        )
    # From here until the new manifest lands, the directory reads as incomplete.
    os.remove(os.path.join(output_dir, manifest_lib.FILENAME))
    return None


def _manifest(request: PrepareRequest, selection: _Selection, recorded: dict,
              case_entries: dict, skipped: list, shards: list) -> dict:
    """The manifest of the written shards (docs/CONTRACTS.md)."""
    config, channels, listing = request.config, selection.channels, selection.listing
    size3 = list(config.size) if len(config.size) == 3 else [*config.size, None]
    image_shape = ([*config.size[:2], channels * (2 * request.context_slices + 1)]
                   if request.output == "slices" else [*size3, channels])
    split_of = selection.split_of
    return {
        "dataset_name": listing.name,
        **recorded,
        "image_shape": image_shape,
        "image_dtype": request.image_dtype,
        "num_classes": len(listing.label_names),
        "label_names": listing.label_names,
        "domains": {
            d: {
                "labelled": any(split_of.get(c.case_id) in SPLITS and c.label_path is not None
                                for c in selection.cases if c.domain == d),
                "cases": {s: [c for c in ids if c in case_entries]
                          for s, ids in selection.assigned[d].items()},
            }
            for d in selection.selected
        },
        "cases": dict(sorted(case_entries.items())),
        "skipped_cases": skipped,
        "shards": shards,
    }
