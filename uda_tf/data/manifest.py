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


def write_manifest(out_dir: str, manifest: dict) -> "Manifest":
    """Stamps `content_hash` and writes `<out_dir>/manifest.json` atomically.

    Call it after every shard is in place: its presence is what marks the data complete.
    Returns the stamped manifest.
    """
    stamped = dict(manifest, format=FORMAT, version=VERSION)
    stamped["content_hash"] = content_hash(stamped)
    from uda_tf.data.sharding import write_json_atomic
    write_json_atomic(os.path.join(out_dir, FILENAME), stamped)
    return Manifest(stamped)


class ManifestError(ValueError):
    """A manifest.json that is unreadable, edited, or not what `prepare` writes; the message
    names the file and the key."""


_UNLABELLED = "unlabelled"  # splits.UNLABELLED (not imported: this module stays light)
_DATA_KEYS = ("domains", "cases", "shards")


def _is_int(value, low=0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _inside_data_dir(file: str) -> bool:
    """A relative path that stays under the data directory (checked on the text)."""
    normal = os.path.normpath(file)
    return bool(file) and not os.path.isabs(file) and normal != os.pardir and \
        not normal.startswith(os.pardir + os.sep) and normal != os.curdir


def validate(manifest, path: str) -> None:
    """Checks the structure docs/CONTRACTS.md promises; ManifestError names `path` and the key.

    Every manifest has image_shape, num_classes, label_names and preprocessing (a model's
    export carries only those); a prepared dataset's also has domains, cases and shards, which
    must refer to each other and keep every shard file inside the data directory.
    """
    def fail(key: str, expected: str, value=None, show=True):
        got = f", got {value!r}"[:200] if show else ""
        raise ManifestError(f"{path}: {key} must be {expected}{got}; the file was edited or "
                            "damaged: prepare the data again")

    if not isinstance(manifest, dict):
        fail("the top level", "a JSON object", type(manifest).__name__)
    for key in ("image_shape", "num_classes", "label_names", "preprocessing"):
        if key not in manifest:
            fail(f"key {key!r}", "present", show=False)
    shape = manifest["image_shape"]
    if not (isinstance(shape, list) and len(shape) in (3, 4)
            and all(v is None or _is_int(v, 1) for v in shape)):
        fail("'image_shape'", "a list of 3 or 4 positive integers (or null for a free depth)",
             shape)
    classes = manifest["num_classes"]
    if not _is_int(classes, 1):
        fail("'num_classes'", "a positive integer", classes)
    names = manifest["label_names"]
    if not (isinstance(names, dict) and set(names) == {str(i) for i in range(classes)}
            and all(isinstance(v, str) for v in names.values())):
        fail("'label_names'", f'{{"0": name, ..., "{classes - 1}": name}} (one string per '
             "class of num_classes)", names)
    if not isinstance(manifest["preprocessing"], dict):
        fail("'preprocessing'", "an object", manifest["preprocessing"])
    if "image_dtype" in manifest and manifest["image_dtype"] not in ("float32", "float16"):
        fail("'image_dtype'", "float32 or float16", manifest["image_dtype"])
    output = manifest.get("output", {})
    if not isinstance(output, dict):
        fail("'output'", "an object", output)
    if "records" in output and output["records"] not in ("slices", "volumes"):
        fail("'output' 'records'", "slices or volumes", output["records"])
    if "context_slices" in output and not _is_int(output["context_slices"]):
        fail("'output' 'context_slices'", "an integer >= 0", output["context_slices"])
    if output.get("compression") not in (None, "", "GZIP"):
        fail("'output' 'compression'", "null or GZIP", output.get("compression"))
    present = [k for k in _DATA_KEYS if k in manifest]
    if not present:
        return
    if len(present) < len(_DATA_KEYS):
        missing = [k for k in _DATA_KEYS if k not in manifest]
        fail(f"keys {missing}", f"present beside {present} (a prepared dataset lists all of "
             f"{list(_DATA_KEYS)})", show=False)
    _validate_data(manifest, fail)


def _validate_data(manifest: dict, fail) -> None:
    from uda_tf.data.preprocess import PreprocessConfig  # numpy only; loaded on demand

    try:
        PreprocessConfig.from_manifest(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail("'preprocessing'", f"the preprocessing parameters prepare records ({e})",
             manifest["preprocessing"])
    splits = (*SPLITS, _UNLABELLED)
    domains, cases = manifest["domains"], manifest["cases"]
    if not isinstance(cases, dict):
        fail("'cases'", "an object {case_id: entry}", type(cases).__name__)
    for case_id, entry in cases.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("domain"), str)
                and entry.get("split") in splits):
            fail(f"'cases'[{case_id!r}]", f"an object with a 'domain' and a 'split' "
                 f"({', '.join(splits)})", entry)
    if not isinstance(domains, dict):
        fail("'domains'", "an object {domain: {labelled, cases}}", type(domains).__name__)
    for domain, entry in domains.items():
        key = f"'domains'[{domain!r}]"
        if not (isinstance(entry, dict) and isinstance(entry.get("labelled"), bool)
                and isinstance(entry.get("cases"), dict)):
            fail(key, "an object with 'labelled' (true/false) and 'cases' {split: [ids]}",
                 entry)
        for split, ids in entry["cases"].items():
            if split not in splits:
                fail(f"{key} 'cases' key {split!r}", f"one of {', '.join(splits)}", split)
            if not isinstance(ids, list):
                fail(f"{key} 'cases'[{split!r}]", "a list of case ids", ids)
            for case_id in ids:
                if not isinstance(case_id, str) or case_id not in cases:
                    fail(f"{key} 'cases'[{split!r}]", "case ids listed under 'cases'",
                         case_id)
                if cases[case_id]["domain"] != domain or cases[case_id]["split"] != split:
                    fail(f"'cases'[{case_id!r}]", f"in domain {domain!r}, split {split!r} "
                         f"as {key} says", cases[case_id])
    for case_id, entry in cases.items():
        if entry["domain"] not in domains:
            fail(f"'cases'[{case_id!r}] 'domain'", f"one of 'domains' {sorted(domains)}",
                 entry["domain"])
    _validate_shards(manifest["shards"], domains, fail)
    skipped = manifest.get("skipped_cases", [])
    if not (isinstance(skipped, list) and all(isinstance(e, dict) for e in skipped)):
        fail("'skipped_cases'", "a list of objects", skipped)


def _validate_shards(shards, domains, fail) -> None:
    splits = (*SPLITS, _UNLABELLED)
    if not isinstance(shards, list):
        fail("'shards'", "a list", type(shards).__name__)
    for index, shard in enumerate(shards):
        key = f"'shards'[{index}]"
        if not isinstance(shard, dict):
            fail(key, "an object {file, records, sha256, domain, split}", shard)
        file = shard.get("file")
        if not (isinstance(file, str) and _inside_data_dir(file)):
            fail(f"{key} 'file'", "a path relative to the data directory that stays inside "
                 "it (no absolute path, no '..')", file)
        if not _is_int(shard.get("records")):
            fail(f"{key} 'records'", "an integer >= 0", shard.get("records"))
        sha = shard.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64
                and all(c in "0123456789abcdef" for c in sha)):
            fail(f"{key} 'sha256'", "64 lowercase hex digits", sha)
        if not isinstance(shard.get("domain"), str) or shard["domain"] not in domains:
            fail(f"{key} 'domain'", f"one of 'domains' {sorted(domains)}", shard.get("domain"))
        if shard.get("split") not in splits:
            fail(f"{key} 'split'", f"one of {', '.join(splits)}", shard.get("split"))


def load_manifest(data_dir: str) -> "Manifest":
    """Reads and checks `<data_dir>/manifest.json`: ManifestError (a ValueError) names the
    file and the key for anything but the structure `prepare` writes, or an edited file."""
    path = os.path.join(data_dir, FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{data_dir} is not a prepared dataset (no {FILENAME}); run "
            f"python -m uda_tf.cli.prepare --input_dir=<raw data> --output_dir={data_dir}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a uda_tf manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"{path} has manifest version {manifest.get('version')!r}, this code reads "
            f"{VERSION}; prepare the data again"
        )
    validate(manifest, path)
    try:
        expected = content_hash(manifest)
    except ValueError as e:  # NaN or Infinity, which json.load accepts
        raise ManifestError(f"{path}: cannot hash its content ({e}); the file was edited: "
                            "prepare the data again") from e
    if manifest.get("content_hash") != expected:
        raise ManifestError(
            f"{path} was modified after it was written (content_hash mismatch): its shards "
            "and cases may no longer match it. Prepare the data again (python -m "
            f"uda_tf.data.prepare ... --output_dir={data_dir} --overwrite) or restore the file")
    return Manifest(manifest)


class Manifest(dict):
    """A manifest as read: still the JSON object (a dict, so json.dump, MLflow and the export's
    assets take it as it is), with the questions callers ask of it as properties and methods,
    so the layout of manifest.json is spelled out here only (nnU-Net's plans_handler wraps its
    plans the same way).

    An export's manifest (predict, serve) has only image_shape, num_classes, label_names and
    preprocessing; the domain, case and shard questions need a prepared dataset's.
    """

    @classmethod
    def of(cls, value) -> "Manifest":
        """`value` if it is a Manifest, else one wrapping it (a dict built by hand)."""
        return value if isinstance(value, cls) else cls(value)

    def as_dict(self) -> dict:
        return dict(self)

    # -- what every manifest has ---------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self["num_classes"])

    @property
    def label_names(self) -> dict[int, str]:
        """{class index: name}; the file's keys are strings ("0", "1", ...)."""
        return {int(k): v for k, v in self["label_names"].items()}

    @property
    def class_names(self) -> list[str]:
        """Names in class order, background first."""
        names = self.label_names
        return [names[i] for i in range(self.num_classes)]

    @property
    def image_shape(self) -> list:
        """[H, W, C] of a slice record, [H, W, D, C] of a volume record (D None: any depth)."""
        return list(self["image_shape"])

    @property
    def image_dtype(self) -> str:
        return self.get("image_dtype", "float32")

    @property
    def preprocessing(self) -> dict:
        return self["preprocessing"]

    @property
    def dataset_name(self) -> str:
        return self.get("dataset_name", "?")

    @property
    def content_hash(self) -> str | None:
        return self.get("content_hash")

    @property
    def record_kind(self) -> str:
        """"slices" (2D records) or "volumes" (3D records); manifests from before 3D: slices."""
        return self.get("output", {}).get("records", "slices")

    @property
    def compression(self) -> str:
        return self.get("output", {}).get("compression") or ""

    @property
    def context_slices(self) -> int:
        return int(self.get("output", {}).get("context_slices", 0))

    # -- a prepared dataset's domains, cases and shards ----------------------------------
    @property
    def domains(self) -> dict:
        """{domain: {"labelled": bool, "cases": {split: [case ids]}}}."""
        return self.get("domains", {})

    def is_labelled(self, domain: str) -> bool:
        """Whether `domain` came with labels at all (a labelled source)."""
        return self.domains[domain].get("labelled", True)

    def case(self, case_id: str) -> dict:
        """The case's entry (domain, split, shapes, affine, has_label); {} if not listed."""
        return self.get("cases", {}).get(case_id, {})

    def cases(self, domain: str, split: str) -> list[str]:
        """Case ids of `domain`'s `split`, in prepared order ([] for a split it lacks)."""
        return list(self.domains[domain]["cases"].get(split, []))

    def labelled_cases(self, domain: str, split: str) -> list[str]:
        """The cases of `domain`'s `split` that carry a label (test images often do not)."""
        return [c for c in self.cases(domain, split) if self.case(c).get("has_label", True)]

    def splits(self, domain: str) -> list[str]:
        """`domain`'s splits that hold cases, sorted."""
        return sorted(s for s, ids in self.domains[domain]["cases"].items() if ids)

    def shards(self, domain: str, split: str) -> list[dict]:
        """Entries of the shards holding `domain`'s `split`, in write order."""
        return [s for s in self["shards"] if s["domain"] == domain and s["split"] == split]

    def num_records(self, domain: str, split: str) -> int:
        """Records (slices, or volumes) of one domain/split, from the shard list."""
        return sum(s["records"] for s in self.shards(domain, split))

    def shard_files(self, data_dir: str, domain: str, split: str) -> list[str]:
        """Paths of the shards holding `domain`'s `split` records, in write order."""
        files = [os.path.join(data_dir, s["file"]) for s in self.shards(domain, split)]
        if not files:
            available = sorted({f"{s['domain']}/{s['split']}" for s in self["shards"]})
            raise ValueError(
                f"no shards for domain {domain!r}, split {split!r} in {data_dir}; "
                f"available domain/split: {', '.join(available) or 'none'}"
            )
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"shard listed in {data_dir}/{FILENAME} is missing: {missing[0]}")
        return files
