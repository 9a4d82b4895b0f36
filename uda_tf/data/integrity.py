"""Checks that prepared shards are what `prepare` wrote, before a run depends on them.

A shard damaged after preparation (a bad disk, an interrupted copy) otherwise surfaces deep
inside `Model.fit` as `DataLossError: corrupted record at 1234`, naming no file. The manifest
lists every shard's sha256 and record count, so the check is exact and names the shard.
"""
from __future__ import annotations

import os

from uda_tf.data.sharding import file_sha256


class ShardCorruptedError(ValueError):
    """A shard is missing, altered or unreadable; the message names it and the remedy."""


def verify_shards(manifest: dict, data_dir: str, domains=None) -> int:
    """sha256 of every shard (of `domains`, default all) against the manifest; returns the
    number checked."""
    checked = 0
    for shard in manifest["shards"]:
        if domains is not None and shard["domain"] not in domains:
            continue
        path = os.path.join(data_dir, shard["file"])
        if not os.path.isfile(path):
            raise ShardCorruptedError(f"shard {path} is missing — re-run prepare")
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            raise ShardCorruptedError(
                f"shard {path} is corrupted (sha256 {digest[:12]}… differs from the manifest's "
                f"{shard['sha256'][:12]}…) — re-run prepare")
        checked += 1
    return checked


def check_records(path: str, compression: str = "", expected: int | None = None) -> int:
    """Reads every record of one shard, which checks each record's CRC; returns the count.
    A bad CRC, a truncated record or a wrong count is a ShardCorruptedError naming `path`."""
    import tensorflow as tf
    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path, compression_type=compression or ""):
            count += 1
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError,
            tf.errors.OutOfRangeError) as e:
        reason = (e.message or str(e)).splitlines()[0]
        raise ShardCorruptedError(f"shard {path} is corrupted (bad CRC or truncated record "
                                  f"after {count} records: {reason}) — re-run prepare") from e
    if expected is not None and count != expected:
        raise ShardCorruptedError(f"shard {path} holds {count} records, the manifest says "
                                  f"{expected} — re-run prepare")
    return count
