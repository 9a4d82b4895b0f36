"""Layouts of public MRI datasets (CC-359, crossMoDA) and a generic glob pairing.

Registered into `layouts.LAYOUTS` when `uda_tf.data.layouts` is imported.
"""
from __future__ import annotations

import collections
import glob
import os
import re

from absl import logging

from uda_tf.data.layouts.base import (CaseProblem, CaseRecord, LayoutError, Listing,
                                 register_layout, sanitize_domain_name)
from uda_tf.files import add_unique

NIFTI = r"\.nii(?:\.gz)?"


def walk_files(root: str):
    """(path relative to root, full path) of every non-hidden file under root, sorted, so
    files may sit in one directory or in any subfolders."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                full = os.path.join(directory, name)
                found.append((os.path.relpath(full, root), full))
    return sorted(found)


def _unique(found: dict, key, path: str, what: str) -> None:
    add_unique(found, key, path, lambda first, again: LayoutError(
        f"two {what} files for {key!r}: {first} and {again}"))


# --- CC-359 (Souza et al. 2018, Calgary-Campinas) ---------------------------------------------
# Original/CC0001_philips_15_55_M.nii.gz: id, vendor, field strength (15 = 1.5 T, 3 = 3 T),
# age, sex. Brain masks sit in Silver-standard*/ (CC0001_philips_15_55_M_ss.nii.gz; the
# STAPLE consensus masks end in _staple, the 12 manual ones in _manual).
_CC359 = re.compile(r"^(?P<case>CC\d{4})_(?P<vendor>siemens|ge|philips)_(?P<field>15|3)_"
                    r"(?P<age>\d+)_(?P<sex>[MF])(?:_(?P<mask>[A-Za-z]+))?" + NIFTI + "$",
                    re.IGNORECASE)


@register_layout("cc359")
def read_cc359(root: str, default_domain: str | None = None, *,
               mask_suffix: str = "ss") -> Listing:
    """CC-359: six domains by vendor x field strength, named like `philips_15` or `ge_3`.

    With any `_<mask_suffix>` mask present, every scan must have one (a missing mask is a
    problem); with none, all scans are unlabelled. `default_domain` does not apply (the file
    name carries the domain)."""
    images, masks, other_masks = {}, {}, 0
    for rel, full in walk_files(root):
        match = _CC359.match(os.path.basename(rel))
        if not match:
            continue
        case_id = match["case"].upper()
        if match["mask"] is None:
            if case_id in images:
                raise LayoutError(f"two scans for {case_id}: {images[case_id][0]} and {full}")
            images[case_id] = (full, f"{match['vendor'].lower()}_{match['field']}")
        elif match["mask"].lower() == mask_suffix.lower():
            _unique(masks, case_id, full, f"_{mask_suffix} mask")
        else:
            other_masks += 1
    if not images:
        raise LayoutError(
            f"{root} does not look like CC-359: expected scans named like "
            "Original/CC0001_philips_15_55_M.nii.gz (and masks Silver-standard/"
            "CC0001_philips_15_55_M_ss.nii.gz)"
        )
    if not masks:
        logging.warning("no CC-359 masks ending in _%s under %s%s; all scans are unlabelled",
                        mask_suffix, root,
                        f" ({other_masks} other masks; see --mask_suffix)" if other_masks else "")
    cases, problems = [], []
    for case_id, (image, domain) in sorted(images.items()):
        label = masks.get(case_id)
        if label is None and masks:
            stem = re.sub(NIFTI + "$", "", os.path.basename(image))
            problems.append(CaseProblem(case_id, domain, (
                f"image {image} has no label: expected Silver-standard/{stem}_{mask_suffix}"
                ".nii.gz")))
            continue
        cases.append(CaseRecord(case_id, domain, image, label, binarize_label=True))
    for case_id in sorted(set(masks) - set(images)):
        logging.warning("mask %s has no image; ignored", masks[case_id])
    return Listing("CC-359", {"0": "background", "1": "brain"}, cases, problems)


# --- crossMoDA (Dorent et al. 2023) -----------------------------------------------------------
# The Zenodo release puts crossmoda2021_ldn_1_ceT1.nii.gz + _Label.nii.gz under
# source_training/, hrT2 scans under target_training/ and target_validation/ (2022/2023 add
# crossmoda2022_etz_*); some copies are flattened into one folder. Both are accepted.
_CROSSMODA = re.compile(r"^(?P<base>crossmoda.*)_(?P<kind>ceT1|hrT2|Label)" + NIFTI + "$")


@register_layout("crossmoda")
def read_crossmoda(root: str, default_domain: str | None = None) -> Listing:
    """Domains `ceT1` (source, labelled: 1 = vestibular schwannoma, 2 = cochlea) and `hrT2`
    (target, unlabelled). Case ids are the file stems (`crossmoda2021_ldn_1_ceT1`).

    A `<base>_Label` file belongs to `<base>_ceT1`; only where no ceT1 of that base exists
    does it label `<base>_hrT2` (target labels, which evaluation alone reads)."""
    found = collections.defaultdict(dict)
    for rel, full in walk_files(root):
        match = _CROSSMODA.match(os.path.basename(rel))
        if match:
            kinds = found[match["base"]]
            if match["kind"] in kinds:
                raise LayoutError(f"two {match['kind']} files for {match['base']!r}: "
                                  f"{kinds[match['kind']]} and {full}")
            kinds[match["kind"]] = full
    if not any("ceT1" in k or "hrT2" in k for k in found.values()):
        raise LayoutError(
            f"{root} does not look like crossMoDA: expected files named like "
            "crossmoda2021_ldn_1_ceT1.nii.gz, crossmoda2021_ldn_1_Label.nii.gz and "
            "crossmoda2021_ldn_106_hrT2.nii.gz (in one folder or in subfolders)"
        )
    cases, problems = [], []
    for base, kinds in sorted(found.items()):
        label = kinds.get("Label")
        if "ceT1" in kinds:
            case_id = f"{base}_ceT1"
            if label is None:
                problems.append(CaseProblem(case_id, "ceT1", (
                    f"image {kinds['ceT1']} has no label: expected {base}_Label.nii.gz next "
                    "to it (source ceT1 scans are labelled)")))
            else:
                cases.append(CaseRecord(case_id, "ceT1", kinds["ceT1"], label))
            label = None  # used by the ceT1 scan
        if "hrT2" in kinds:
            cases.append(CaseRecord(f"{base}_hrT2", "hrT2", kinds["hrT2"], label))
        elif label is not None:
            logging.warning("label %s has no ceT1 or hrT2 scan; ignored", label)
    names = {"0": "background", "1": "vestibular_schwannoma", "2": "cochlea"}
    return Listing("crossMoDA", names, cases, problems)


# --- anything else: glob pairing --------------------------------------------------------------
_DEFAULT_CASE = r"(?P<case>[^/\\]+?)(?:_0000)?(?:\.nii\.gz|\.nii|\.[A-Za-z]+(?:\.gz)?)$"


def _compile(pattern: str, option: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--{option}={pattern!r} is not a valid regular expression: {e}") from e


def _group(match: re.Match, name: str) -> str:
    return match[name] if name in match.re.groupindex else match[1 if match.re.groups else 0]


def _glob_files(root: str, pattern: str, option: str) -> list[str]:
    files = sorted(p for p in glob.glob(os.path.join(root, pattern), recursive=True)
                   if os.path.isfile(p))
    if not files and option == "image_glob":
        raise LayoutError(f"--image_glob={pattern!r} matches no file under {root}")
    return files


def _by_case(root, files, case_re, option) -> dict[str, str]:
    out = {}
    for path in files:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        match = case_re.search(rel)
        if not match:
            raise LayoutError(f"--case_regex={case_re.pattern!r} does not match {path} "
                              f"(matched by --{option})")
        _unique(out, _group(match, "case"), path, option.replace("_glob", ""))
    return out


@register_layout("glob")
def read_glob(root: str, default_domain: str | None = None, *, image_glob: str | None = None,
              label_glob: str | None = None, mask_glob: str | None = None,
              case_regex: str | None = None, domain_regex: str | None = None,
              label_names: str | None = None, binary_labels: bool = False) -> Listing:
    """Images matched by `image_glob` (relative to root, `**` recurses), labels by
    `label_glob`, paired by the case id `case_regex` finds in each relative path (group `case`,
    else group 1; default: the file name without extension and `_0000`). `domain_regex`
    (group `domain`, else 1) names each image's domain; default `default_domain`, else the
    root folder's name. Within a domain that has labels, an image without one is a problem;
    a domain without any label is unlabelled. `label_names`: comma-separated class names,
    value 0 first (default background,foreground)."""
    if not image_glob:
        raise ValueError("layout 'glob' needs --image_glob (e.g. 'images/*.nii.gz')")
    case_re = _compile(case_regex or _DEFAULT_CASE, "case_regex")
    images = _by_case(root, _glob_files(root, image_glob, "image_glob"), case_re, "image_glob")
    labels = (_by_case(root, _glob_files(root, label_glob, "label_glob"), case_re, "label_glob")
              if label_glob else {})
    masks = (_by_case(root, _glob_files(root, mask_glob, "mask_glob"), case_re, "mask_glob")
             if mask_glob else {})
    if label_glob and not labels:
        raise LayoutError(f"--label_glob={label_glob!r} matches no file under {root}")
    labels = {c: p for c, p in labels.items() if p not in images.values()}
    default = default_domain or sanitize_domain_name(os.path.basename(os.path.normpath(root)))
    domain_of = {}
    if domain_regex:
        domain_re = _compile(domain_regex, "domain_regex")
        for case_id, path in images.items():
            match = domain_re.search(os.path.relpath(path, root).replace(os.sep, "/"))
            if not match:
                raise LayoutError(f"--domain_regex={domain_regex!r} does not match {path}")
            domain_of[case_id] = sanitize_domain_name(_group(match, "domain"))
    else:
        domain_of = {case_id: default for case_id in images}
    labelled_domains = {domain_of[c] for c in images if c in labels}
    cases, problems = [], []
    for case_id, image in sorted(images.items()):
        domain, label = domain_of[case_id], labels.get(case_id)
        if label is None and domain in labelled_domains:
            problems.append(CaseProblem(case_id, domain, (
                f"image {image} has no label: no file matched by --label_glob={label_glob!r} "
                f"has case id {case_id!r} (domain {domain!r} has labels for other cases)")))
            continue
        cases.append(CaseRecord(case_id, domain, image, label, masks.get(case_id),
                                binarize_label=bool(binary_labels)))
    for case_id in sorted(set(labels) - set(images)):
        logging.warning("label %s has no image; ignored", labels[case_id])
    names = [n.strip() for n in (label_names or "background,foreground").split(",")]
    if len(names) < 2 or not all(names):
        raise ValueError(f"--label_names needs at least two non-empty names, got {label_names!r}")
    name = os.path.basename(os.path.normpath(root))
    return Listing(name, {str(i): n for i, n in enumerate(names)}, cases, problems)
