"""Resumable, atomic shard writing for `prepare`.

The records of one (domain, split) group fill shards `<out>/shards/<domain>-<split>-<k>.tfrecord`
of `records_per_shard` records each, in a fixed case order. Every shard is written under a
temporary name and renamed into place; then a completion marker
`<out>/.progress/<domain>-<split>-<k>.json` records it (records, sha256, size), the manifest
entries of the cases that ended in it, the cases skipped meanwhile, and where to resume: the
position of the next case in the group and how many of its records are already written. When the
group ends, `<domain>-<split>.done.json` gathers all of it.

A re-run of the same request (same `request_id`) keeps every shard whose marker and file are
intact, preprocesses only the cases from the resume point on, and writes the remaining shards
with the same names and bytes an uninterrupted run would have written: records are
deterministic and their order is fixed. The manifest is assembled from the markers, so it is the
same too. A shard renamed into place without its marker (an interruption between the two) is
simply written again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re

from uda_tf import files

SHARDS_DIR = "shards"
PROGRESS_DIR = ".progress"
# Called with each completed shard's entry after its marker is written; tests set it to
# interrupt a run at a chosen shard, as a crash or Ctrl-C would.
AFTER_SHARD_HOOK = None


def write_json_atomic(path: str, value) -> None:
    """The JSON format of prepare's files (markers, manifest): sorted keys, no NaN."""
    files.write_json(path, value, indent=1, sort_keys=True, allow_nan=False)


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # absent or torn: as if not written


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The temporary files of write_json_atomic and GroupWriter: files.partial_path's names, and
# the ".tmp-<pid>" names earlier versions gave them.
_TEMPORARY = re.compile(r"^.+\.(tfrecord|json)\.tmp-\d+$")


def _is_temporary(name: str) -> bool:
    return (bool(_TEMPORARY.match(name))
            or (files.is_partial(name) and name.endswith((".tfrecord", ".json"))))


def remove_temporary_files(output_dir: str) -> None:
    """Temporary shards and markers an interrupted run left behind (only names of the form
    this module writes, so a user's file in a shards/ folder is left alone)."""
    for sub in (SHARDS_DIR, PROGRESS_DIR):
        directory = os.path.join(output_dir, sub)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if _is_temporary(name) and os.path.isfile(path) and not os.path.islink(path):
                    os.remove(path)


# The names of the markers under .progress/: request.json, <domain>-<split>-<k>.json,
# <domain>-<split>.done.json (and their temporary files).
_MARKER = re.compile(r"^(request|.+-(train|val|test|unlabelled)(-\d{5}|\.done))\.json"
                     r"(\.tmp-\d+)?$")


def remove_progress(output_dir: str) -> None:
    """Removes the progress markers prepare wrote, and `.progress/` once empty; anything else
    found there (not ours) stays."""
    directory = os.path.join(output_dir, PROGRESS_DIR)
    if not os.path.isdir(directory) or os.path.islink(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        ours = _MARKER.match(name) or _is_temporary(name)
        if ours and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    try:
        os.rmdir(directory)
    except OSError:
        pass  # not empty: someone else's files


def listed_shards(document) -> set[str]:
    """Base names of the shards under shards/ that a manifest or a progress marker lists
    (`shards`, and a marker's `shard`). Read from files an earlier run left, so anything
    malformed (not a dict, a file elsewhere) is skipped, not trusted."""
    if not isinstance(document, dict):
        return set()
    entries = document.get("shards") if isinstance(document.get("shards"), list) else []
    entries = entries + ([document["shard"]] if isinstance(document.get("shard"), dict) else [])
    names = set()
    for entry in entries:
        file = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(file, str) and os.path.dirname(os.path.normpath(file)) == SHARDS_DIR:
            names.add(os.path.basename(file))
    return names


def marked_shards(output_dir: str, manifest=None) -> set[str]:
    """Base names of the shards under shards/ that prepare recorded as its own: in the progress
    markers under `<out>/.progress/` (finished or interrupted runs, any request) and in
    `manifest`, an earlier manifest of `output_dir` as read (anything else counts as none)."""
    names = listed_shards(manifest)
    for path in glob.glob(os.path.join(output_dir, PROGRESS_DIR, "*.json")):
        names |= listed_shards(read_json(path))
    return names


class GroupWriter:
    """Writes one group's records; see the module docstring. After construction, `complete`
    says the group was finished by an earlier run, and `resume` = (case position, records of
    that case already written) says where an unfinished one goes on."""

    def __init__(self, output_dir: str, prefix: str, records_per_shard: int, request_id: str,
                 *, compression: str | None = None):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.output_dir, self.prefix = output_dir, prefix
        self.records_per_shard, self.request_id = records_per_shard, request_id
        self.compression = compression
        self.shards_dir = os.path.join(output_dir, SHARDS_DIR)
        self.progress_dir = os.path.join(output_dir, PROGRESS_DIR)
        os.makedirs(self.shards_dir, exist_ok=True)
        os.makedirs(self.progress_dir, exist_ok=True)
        self.shards: list[dict] = []
        self.cases: dict[str, dict] = {}
        self.skipped: list[dict] = []
        self.resume = (0, 0)
        self._pending_cases: dict[str, dict] = {}
        self._pending_skipped: list[dict] = []
        self._writer = self._tmp_path = None
        self._count = 0
        self.complete = self._load()

    # -- resuming ------------------------------------------------------------------------------
    def _marker_path(self, k: int | None) -> str:
        name = f"{self.prefix}.done.json" if k is None else f"{self.prefix}-{k:05d}.json"
        return os.path.join(self.progress_dir, name)

    def _intact(self, shard: dict) -> bool:
        path = os.path.join(self.output_dir, shard["file"])
        return os.path.isfile(path) and os.path.getsize(path) == shard["size"]

    def _load(self) -> bool:
        group = read_json(self._marker_path(None))
        if (isinstance(group, dict) and group.get("request") == self.request_id
                and all(self._intact(s) for s in group["shards"])):
            self.shards, self.cases = group["shards"], group["cases"]
            self.skipped = group["skipped"]
            return True
        while True:
            marker = read_json(self._marker_path(len(self.shards)))
            if not (isinstance(marker, dict) and marker.get("request") == self.request_id
                    and self._intact(marker["shard"])):
                return False
            self.shards.append(marker["shard"])
            self.cases.update(marker["cases"])
            self.skipped += marker["skipped"]
            self.resume = tuple(marker["resume"])

    # -- writing -------------------------------------------------------------------------------
    def write(self, record: bytes, position: int, offset: int) -> None:
        """Record `offset` of the case at `position` in the group."""
        if self._writer is not None and self._count == self.records_per_shard:
            self._close(resume=(position, offset))  # a shard boundary inside a case
        if self._writer is None:
            # TensorFlow here, not at import: spawned preprocessing workers import this
            # package and need none of it.
            import tensorflow as tf

            from uda_tf.data.tfrecord import tfrecord_options

            name = f"{self.prefix}-{len(self.shards):05d}.tfrecord"
            self._tmp_path = files.partial_path(os.path.join(self.shards_dir, name))
            self._writer = tf.io.TFRecordWriter(self._tmp_path,
                                                tfrecord_options(self.compression))
            self._count = 0
        self._writer.write(record)
        self._count += 1

    def case_done(self, position: int, case_id: str, record: dict) -> None:
        self._pending_cases[case_id] = record
        if self._writer is not None and self._count == self.records_per_shard:
            self._close(resume=(position + 1, 0))

    def case_skipped(self, entry: dict) -> None:
        self._pending_skipped.append(entry)

    def _close(self, resume) -> None:
        self._writer.close()
        name = f"{self.prefix}-{len(self.shards):05d}.tfrecord"
        final = os.path.join(self.shards_dir, name)
        sha = file_sha256(self._tmp_path)
        os.replace(self._tmp_path, final)
        shard = {"file": f"{SHARDS_DIR}/{name}", "records": self._count, "sha256": sha,
                 "size": os.path.getsize(final)}
        # Through JSON and back, so a resumed run holds exactly what a fresh run holds.
        marker = json.loads(json.dumps({
            "request": self.request_id, "shard": shard, "resume": list(resume),
            "cases": self._pending_cases, "skipped": self._pending_skipped}))
        write_json_atomic(self._marker_path(len(self.shards)), marker)
        self.shards.append(marker["shard"])
        self.cases.update(marker["cases"])
        self.skipped += marker["skipped"]
        self._pending_cases, self._pending_skipped = {}, []
        self._writer = self._tmp_path = None
        if AFTER_SHARD_HOOK is not None:
            AFTER_SHARD_HOOK(shard)

    def finish(self, num_cases: int) -> None:
        """Closes the last shard and writes the group's completion marker."""
        if self._writer is not None:
            self._close(resume=(num_cases, 0))
        group = json.loads(json.dumps({
            "request": self.request_id, "shards": self.shards,
            "cases": {**self.cases, **self._pending_cases},
            "skipped": self.skipped + self._pending_skipped}))
        write_json_atomic(self._marker_path(None), group)
        self.shards, self.cases, self.skipped = group["shards"], group["cases"], group["skipped"]
        self._pending_cases, self._pending_skipped = {}, []
        self.complete = True

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if os.path.exists(self._tmp_path):
                os.remove(self._tmp_path)
            self._writer = self._tmp_path = None
