"""Raw dataset layouts: each reader turns a directory into a list of cases.

A reader is registered by name (`@register_layout("msd")`) and called as
`reader(root, default_domain) -> Listing`. It only looks at file names and metadata; reading
voxels is `io.read_volume`'s job, later and in worker processes.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Callable

from absl import logging

DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class LayoutError(ValueError):
    """The input directory does not look like the requested layout."""


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    case_id: str
    domain: str
    image_path: str
    label_path: str | None


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a reader found: dataset name, label names {"0": "background", ...}, cases."""

    name: str
    label_names: dict[str, str]
    cases: list[CaseRecord]


Reader = Callable[[str, "str | None"], Listing]
LAYOUTS: dict[str, Reader] = {}


def register_layout(name: str) -> Callable[[Reader], Reader]:
    def wrap(reader: Reader) -> Reader:
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is already registered")
        LAYOUTS[name] = reader
        return reader

    return wrap


def read_layout(name: str, root: str, default_domain: str | None = None) -> Listing:
    """Lists the cases under `root` with the reader registered as `name`."""
    if name not in LAYOUTS:
        raise ValueError(
            f"unknown layout {name!r}; available layouts: {', '.join(sorted(LAYOUTS))}"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input directory not found: {root}")
    listing = LAYOUTS[name](root, default_domain)
    if not listing.cases:
        raise LayoutError(f"no cases found in {root} (layout {name!r})")
    counts = collections.Counter(c.case_id for c in listing.cases)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
        raise LayoutError(f"case ids appear more than once in {root}: {duplicates}")
    for case in listing.cases:
        check_domain_name(case.domain, where=f"dataset in {root}")
    return listing


def check_domain_name(domain: str, where: str) -> None:
    # Domain names become parts of shard file names.
    if not DOMAIN_NAME.match(domain):
        raise LayoutError(
            f"domain name {domain!r} from {where} may only contain letters, digits, '_' and '.'"
        )


def sanitize_domain_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_")
    return cleaned or "default"


def parse_label_names(labels: object, where: str) -> dict[str, str]:
    """Accepts nnU-Net v2 {"background": 0, ...} and MSD v1 {"0": "background", ...}.

    Values must cover 0..K-1 exactly: the class index is the position in the model output.
    """
    if not isinstance(labels, dict) or not labels:
        raise LayoutError(f"{where}: 'labels' must be a non-empty mapping")
    by_value: dict[int, str] = {}
    msd_v1 = all(isinstance(v, str) for v in labels.values())
    for key, value in labels.items():
        name, index = (value, key) if msd_v1 else (key, value)
        if isinstance(index, str) and index.strip().lstrip("-").isdigit():
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int):
            raise LayoutError(
                f"{where}: label {key!r}: {value!r} is neither nnU-Net v2 form "
                '{"name": int} nor MSD v1 form {"0": "name"} (region labels are not supported)'
            )
        if index in by_value:
            raise LayoutError(f"{where}: label value {index} is given twice")
        by_value[index] = str(name)
    if sorted(by_value) != list(range(len(by_value))):
        raise LayoutError(
            f"{where}: label values must be 0..{len(by_value) - 1} without gaps, "
            f"got {sorted(by_value)}"
        )
    return {str(i): by_value[i] for i in range(len(by_value))}


def _read_dataset_json(root: str) -> dict:
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        raise LayoutError(
            f"{root} is not an MSD/nnU-Net dataset: expected {path} "
            "next to imagesTr/ and labelsTr/"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LayoutError(f"cannot parse {path}: {e}") from e
    if not isinstance(meta, dict):
        raise LayoutError(f"{path}: expected a JSON object")
    return meta


def _msd_pairs(root: str, meta: dict, ending: str) -> dict[str, tuple[str, str]]:
    """case_id -> (image path, expected label path)."""
    images_dir = os.path.join(root, "imagesTr")
    labels_dir = os.path.join(root, "labelsTr")
    if isinstance(meta.get("training"), list):
        # MSD v1 lists its pairs explicitly and names images without the _0000 suffix.
        pairs = {}
        for entry in meta["training"]:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise LayoutError(
                    f"{root}/dataset.json: every 'training' entry needs 'image' and 'label'"
                )
            image = os.path.normpath(os.path.join(root, entry["image"]))
            label = os.path.normpath(os.path.join(root, entry["label"]))
            name = os.path.basename(image)
            case_id = name[: -len(ending)] if name.endswith(ending) else name.split(".")[0]
            case_id = case_id[:-5] if case_id.endswith("_0000") else case_id
            pairs[case_id] = (image, label)
        return pairs
    if not os.path.isdir(images_dir):
        raise LayoutError(f"{root} is not an MSD/nnU-Net dataset: expected directory {images_dir}")
    pairs = {}
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    for name in sorted(os.listdir(images_dir)):
        if name.startswith("."):  # macOS AppleDouble files ship inside MSD archives
            continue
        if not name.endswith(ending):
            continue
        match = pattern.match(name)
        if not match:
            raise LayoutError(
                f"unexpected image name {os.path.join(images_dir, name)}: expected "
                f"<case_id>_0000{ending} (or list MSD v1 pairs under 'training' in dataset.json)"
            )
        if match["channel"] != "0000":
            raise LayoutError(
                f"{os.path.join(images_dir, name)}: only single-channel datasets (_0000) "
                "are supported"
            )
        case_id = match["case"]
        pairs[case_id] = (
            os.path.join(images_dir, name),
            os.path.join(labels_dir, case_id + ending),
        )
    return pairs


def _domains_of(meta: dict, case_ids: list[str], root: str, default: str) -> dict[str, str]:
    domains = meta.get("domains")
    if domains is None:
        return {case_id: default for case_id in case_ids}
    where = f"{root}/dataset.json 'domains'"
    if not isinstance(domains, dict) or not all(isinstance(v, list) for v in domains.values()):
        raise LayoutError(f"{where} must map domain names to lists of case ids")
    known = set(case_ids)
    of_case: dict[str, str] = {}
    for domain, members in domains.items():
        check_domain_name(domain, where)
        for case_id in members:
            if case_id not in known:
                raise LayoutError(
                    f"{where}: case {case_id!r} of domain {domain!r} has no image in "
                    f"{root}/imagesTr"
                )
            if case_id in of_case:
                raise LayoutError(
                    f"{where}: case {case_id!r} is in both {of_case[case_id]!r} and {domain!r}"
                )
            of_case[case_id] = domain
    missing = [c for c in case_ids if c not in of_case]
    if missing:
        raise LayoutError(f"{where} does not assign cases {missing[:5]} to any domain")
    return of_case


@register_layout("msd")
def read_msd(root: str, default_domain: str | None = None) -> Listing:
    """nnU-Net v2 / Medical Segmentation Decathlon layout (docs/CONTRACTS.md)."""
    meta = _read_dataset_json(root)
    where = f"{root}/dataset.json"
    if "labels" not in meta:
        raise LayoutError(f"{where}: missing key 'labels'")
    label_names = parse_label_names(meta["labels"], where)
    channels = meta.get("channel_names", meta.get("modality", {"0": ""}))
    if isinstance(channels, dict) and len(channels) > 1:
        raise LayoutError(
            f"{where}: {len(channels)} channels {sorted(channels.values())}; "
            "only single-channel datasets are supported"
        )
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise LayoutError(f"{where}: file_ending {ending!r} is not NIfTI (.nii.gz or .nii)")
    name = str(meta.get("name") or os.path.basename(os.path.normpath(root)))
    pairs = _msd_pairs(root, meta, ending)
    for case_id, (image, label) in sorted(pairs.items()):
        if not os.path.isfile(image):
            raise LayoutError(f"image of case {case_id!r} not found: expected {image}")
        if not os.path.isfile(label):
            raise LayoutError(f"label of case {case_id!r} not found: expected {label}")
    expected = meta.get("numTraining")
    if isinstance(expected, int) and expected != len(pairs):
        logging.warning(
            "%s says numTraining=%d but %d cases were found", where, expected, len(pairs)
        )
    default = default_domain or sanitize_domain_name(name)
    domain_of = _domains_of(meta, sorted(pairs), root, default)
    cases = [
        CaseRecord(case_id, domain_of[case_id], image, label)
        for case_id, (image, label) in sorted(pairs.items())
    ]
    return Listing(name=name, label_names=label_names, cases=cases)
