"""The Medical Segmentation Decathlon / nnU-Net layout (`msd`): dataset.json, imagesTr/,
labelsTr/, imagesTs/, in its v1 (list of image/label pairs) and v2 (file_ending) forms."""
from __future__ import annotations

import json
import os
import re

from absl import logging

from uda_tf.data.layouts.base import (CaseProblem, CaseRecord, LayoutError, Listing,
                                      check_domain_name, parse_label_names, register_layout,
                                      sanitize_domain_name)
from uda_tf.files import add_unique


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


def _msd_v1_case_id(path: str, ending: str) -> str:
    name = os.path.basename(path)
    case_id = name[: -len(ending)] if name.endswith(ending) else name.split(".")[0]
    return case_id[:-5] if case_id.endswith("_0000") else case_id


def _msd_images(directory: str, ending: str, allow_plain: bool,
                channels: int = 1) -> dict[str, tuple[str, ...]]:
    """case_id -> its image paths, channel 0 first, for `<case>_<channel><ending>` files with
    channels 0000 .. `channels`-1 (or `<case><ending>` when `allow_plain`, as MSD v1 names
    its imagesTs). A case missing a channel, or a channel the dataset does not declare, is a
    LayoutError naming the file."""
    found: dict[str, dict[int, str]] = {}
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not name.endswith(ending):  # macOS AppleDouble files ship
            continue                                             # inside MSD archives
        path = os.path.join(directory, name)
        match = pattern.match(name)
        if not match:
            if allow_plain and channels == 1:
                found.setdefault(name[: -len(ending)], {})[0] = path
                continue
            raise LayoutError(
                f"unexpected image name {path}: expected <case_id>_0000{ending} (or list "
                "MSD v1 pairs under 'training' in dataset.json)"
            )
        channel = int(match["channel"])
        if channel >= channels:
            raise LayoutError(f"{path}: channel {match['channel']}, but dataset.json declares "
                              f"{channels} channel(s) (channel_names)")
        found.setdefault(match["case"], {})[channel] = path
    images = {}
    for case_id, paths in found.items():
        missing = [k for k in range(channels) if k not in paths]
        if missing:
            raise LayoutError(
                f"case {case_id!r} in {directory} has no channel {missing[0]:04d}: expected "
                f"{os.path.join(directory, f'{case_id}_{missing[0]:04d}{ending}')} (dataset.json "
                f"declares {channels} channels)")
        images[case_id] = tuple(paths[k] for k in range(channels))
    return images


def _relative_path(value, root: str, where: str) -> str:
    """`root`/`value` for a path a dataset.json lists; it must be a relative path that stays
    inside the dataset root (checked on the text: a linked imagesTr/ may live elsewhere)."""
    if not isinstance(value, str) or not value:
        raise LayoutError(f"{where}: expected a non-empty relative path string, got {value!r}")
    relative = os.path.normpath(value)
    if os.path.isabs(value) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise LayoutError(f"{where}: {value!r} must be a path relative to the dataset root "
                          f"{root} that stays inside it (no absolute path, no '..' leaving it)")
    return os.path.normpath(os.path.join(root, relative))


def _unique_case(found: dict, case_id: str, path: str, entry: str, where: str) -> None:
    """Records `case_id` -> (path, entry) (`entry` names the dataset.json item, so two
    entries always differ)."""
    add_unique(found, case_id, (path, entry), lambda first, again: LayoutError(
        f"{where}: {first[1]} ({first[0]}) and {entry} ({path}) both give case id "
        f"{case_id!r} (case ids are file names without their ending, whatever the folder); "
        "rename one so every case has its own file name"))


def _msd_pairs(root: str, meta: dict, ending: str,
               channels: int = 1) -> dict[str, tuple[tuple[str, ...], str]]:
    """case_id -> (image paths, expected label path) of the training (labelled) cases."""
    images_dir = os.path.join(root, "imagesTr")
    labels_dir = os.path.join(root, "labelsTr")
    where = f"{root}/dataset.json"
    training = meta.get("training")
    if training is not None and not isinstance(training, list):
        raise LayoutError(f"{where}: 'training' must be a list of {{\"image\": ..., "
                          f"\"label\": ...}} objects, got {type(training).__name__}")
    if isinstance(training, list):
        # MSD v1 lists its pairs explicitly and names images without the _0000 suffix.
        found, labels = {}, {}
        for index, entry in enumerate(training):
            at = f"{where} 'training'[{index}]"
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise LayoutError(
                    f"{at}: expected an object with 'image' and 'label' paths, got {entry!r}")
            image = _relative_path(entry["image"], root, f"{at} 'image'")
            label = _relative_path(entry["label"], root, f"{at} 'label'")
            _unique_case(found, _msd_v1_case_id(image, ending), image,
                         f"'training'[{index}] {entry['image']!r}", where)
            labels[image] = label
        return {case_id: ((image,), labels[image]) for case_id, (image, _) in found.items()}
    if not os.path.isdir(images_dir):
        raise LayoutError(f"{root} is not an MSD/nnU-Net dataset: expected directory {images_dir}")
    return {
        case_id: (images, os.path.join(labels_dir, case_id + ending))
        for case_id, images in _msd_images(images_dir, ending, False, channels).items()
    }


def _msd_test_images(root: str, meta: dict, ending: str,
                     channels: int = 1) -> dict[str, tuple[str, ...]]:
    """case_id -> image path of the unlabelled imagesTs/ cases (MSD v1 'test' list, or the
    directory listing)."""
    where = f"{root}/dataset.json"
    test = meta.get("test")
    if test is not None and not isinstance(test, list):
        raise LayoutError(f"{where}: 'test' must be a list of image paths, got "
                          f"{type(test).__name__}")
    if isinstance(test, list):
        found = {}
        for index, value in enumerate(test):
            path = _relative_path(value, root, f"{where} 'test'[{index}]")
            _unique_case(found, _msd_v1_case_id(path, ending), path,
                         f"'test'[{index}] {value!r}", where)
        return {case_id: (path,) for case_id, (path, _) in found.items()}
    directory = os.path.join(root, "imagesTs")
    if not os.path.isdir(directory):
        return {}
    return _msd_images(directory, ending, True, channels)


def _check_domains(meta: dict, where: str) -> None:
    """'domains' must be {name: [case id strings]}; anything else names the key."""
    domains = meta.get("domains")
    if domains is None:
        return
    if not isinstance(domains, dict):
        raise LayoutError(f"{where} 'domains' must map domain names to lists of case ids, "
                          f"got {type(domains).__name__}")
    for domain, members in domains.items():
        if not isinstance(members, list):
            raise LayoutError(f"{where} 'domains'[{domain!r}] must be a list of case ids, got "
                              f"{members!r}")
        for member in members:
            if not isinstance(member, str):
                raise LayoutError(f"{where} 'domains'[{domain!r}] holds {member!r}; expected "
                                  "case id strings only")


def _domains_of(meta: dict, case_ids: list[str], root: str, default: str) -> dict[str, str]:
    domains = meta.get("domains")
    if domains is None:
        return {case_id: default for case_id in case_ids}
    where = f"{root}/dataset.json 'domains'"
    _check_domains(meta, f"{root}/dataset.json")
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
    """nnU-Net v2 / Medical Segmentation Decathlon layout (docs/CONTRACTS.md): imagesTr/ +
    labelsTr/ are labelled cases, imagesTs/ unlabelled ones."""
    meta = _read_dataset_json(root)
    where = f"{root}/dataset.json"
    if "labels" not in meta:
        raise LayoutError(f"{where}: missing key 'labels'")
    label_names = parse_label_names(meta["labels"], where)
    declared = meta.get("channel_names", meta.get("modality", {"0": ""}))
    if not isinstance(declared, dict) or not declared:
        raise LayoutError(f"{where}: 'channel_names' must map channel numbers to names, got "
                          f"{declared!r}")
    channels = len(declared)
    if channels > 1 and isinstance(meta.get("training"), list):
        raise LayoutError(
            f"{where}: {channels} channels in MSD v1 form (one 4D image per case); convert it "
            "to the nnU-Net v2 layout (one file per channel, <case>_0000, <case>_0001, ...; "
            "nnU-Net's nnUNetv2_convert_MSD_dataset does this)")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise LayoutError(f"{where}: file_ending {ending!r} is not NIfTI (.nii.gz or .nii)")
    name = str(meta.get("name") or os.path.basename(os.path.normpath(root)))
    _check_domains(meta, where)
    pairs = _msd_pairs(root, meta, ending, channels)
    tests = _msd_test_images(root, meta, ending, channels)
    for case_id, (images, _) in sorted(pairs.items()):
        if not os.path.isfile(images[0]):
            raise LayoutError(f"image of case {case_id!r} not found: expected {images[0]}")
    for case_id, images in sorted(tests.items()):
        if not os.path.isfile(images[0]):
            raise LayoutError(f"test image of case {case_id!r} not found: expected {images[0]}")
    expected = meta.get("numTraining")
    if isinstance(expected, int) and expected != len(pairs):
        logging.warning(
            "%s says numTraining=%d but %d cases were found", where, expected, len(pairs)
        )
    default = default_domain or sanitize_domain_name(name)
    if meta.get("domains") is not None:
        listed = {c for members in meta["domains"].values() if isinstance(members, list)
                  for c in members}
        unassigned = sorted(set(tests) - listed)
        if unassigned:
            # A test image's domain cannot be guessed once the dataset names its domains.
            logging.warning("%s 'domains' does not list imagesTs cases %s; they are left out",
                            where, unassigned[:5])
            tests = {c: p for c, p in tests.items() if c in listed}
    domain_of = _domains_of(meta, sorted(set(pairs) | set(tests)), root, default)
    cases, problems = [], []
    for case_id, (images, label) in sorted(pairs.items()):
        if os.path.isfile(label):
            cases.append(CaseRecord(case_id, domain_of[case_id], images[0], label,
                                    channel_paths=images[1:]))
        else:
            problems.append(CaseProblem(
                case_id, domain_of[case_id],
                f"image {images[0]} has no label: expected {label} (labelsTr/<case_id>{ending})"))
    cases += [CaseRecord(c, domain_of[c], p[0], None, channel_paths=p[1:])
              for c, p in sorted(tests.items())]
    return Listing(name=name, label_names=label_names, cases=cases, problems=problems)
