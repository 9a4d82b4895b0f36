"""manifest.json of a prepared dataset: the index of its shards (docs/CONTRACTS.md).

The manifest is written last and atomically; a directory without one is not a prepared
dataset (or an interrupted `prepare`).
"""
from __future__ import annotations

import hashlib
import json
import os

FORMAT = "uda_tf.prepared"
VERSION = 1
FILENAME = "manifest.json"
SPLITS = ("train", "val", "test")


def content_hash(manifest: dict) -> str:
    """sha256 of the manifest without its own `content_hash`.

    The manifest lists every shard's sha256, so this one value names the data exactly; it
    holds no timestamps, so preparing the same inputs with the same parameters reproduces it.
    """
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(out_dir: str, manifest: dict) -> dict:
    """Stamps `content_hash` and writes `<out_dir>/manifest.json` atomically.

    Call it after every shard is in place: its presence is what marks the data complete.
    Returns the stamped manifest.
    """
    stamped = dict(manifest, format=FORMAT, version=VERSION)
    stamped["content_hash"] = content_hash(stamped)
    from uda_tf.data.sharding import write_json_atomic
    write_json_atomic(os.path.join(out_dir, FILENAME), stamped)
    return stamped


def load_manifest(data_dir: str) -> dict:
    """Reads and checks `<data_dir>/manifest.json`."""
    path = os.path.join(data_dir, FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{data_dir} is not a prepared dataset (no {FILENAME}); run "
            f"python -m uda_tf.prepare --input_dir=<raw data> --output_dir={data_dir}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a uda_tf manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} has manifest version {manifest.get('version')}, this code reads {VERSION}; "
            "prepare the data again"
        )
    if manifest.get("content_hash") != content_hash(manifest):
        raise ValueError(f"{path} was modified after it was written (content_hash mismatch)")
    return manifest


def shard_files(manifest: dict, data_dir: str, domain: str, split: str) -> list[str]:
    """Paths of the shards holding `domain`'s `split` slices, in write order."""
    files = [
        os.path.join(data_dir, s["file"])
        for s in manifest["shards"]
        if s["domain"] == domain and s["split"] == split
    ]
    if not files:
        available = sorted({f"{s['domain']}/{s['split']}" for s in manifest["shards"]})
        raise ValueError(
            f"no shards for domain {domain!r}, split {split!r} in {data_dir}; "
            f"available domain/split: {', '.join(available) or 'none'}"
        )
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"shard listed in {data_dir}/{FILENAME} is missing: {missing[0]}")
    return files
