"""Layouts of the 2D retinal vessel datasets DRIVE and STARE, read with Pillow.

Each picture becomes a single-slice volume (uda_tf.data.io.read_picture); how RGB becomes
channels is the preprocessing option `color` (green channel by default). Annotations are
binary vessel masks stored as 0/255 and are read as 0/1.
Registered into `layouts.LAYOUTS` when `uda_tf.data.layouts` is imported.
"""
from __future__ import annotations

import os
import re

from absl import logging

from uda_tf.data.layouts.base import CaseProblem, CaseRecord, LayoutError, Listing, register_layout
from uda_tf.data.layouts.mri import walk_files

VESSEL_LABELS = {"0": "background", "1": "vessel"}

# DRIVE (Staal et al. 2004): training/images/21_training.tif,
# training/1st_manual/21_manual1.gif, training/mask/21_training_mask.gif, and the same under
# test/ (01_test.tif ...; the current release withholds test/1st_manual).
_DRIVE_IMAGE = re.compile(r"^(?:.*/)?(?P<set>training|test)/images/(?P<n>\d+)_(?P=set)\.tiff?$")


@register_layout("drive")
def read_drive(root: str, default_domain: str | None = None) -> Listing:
    """Cases `21_training`, `01_test`, ... in one domain (`default_domain`, else `drive`).

    A set (training/ or test/) with a 1st_manual/ folder is labelled and each of its images
    must have `<n>_manual1.gif`; without the folder its images are unlabelled. The field of
    view masks (mask/<n>_<set>_mask.gif) become the case's region of interest."""
    domain = default_domain or "drive"
    cases, problems = [], []
    for rel, full in walk_files(root):
        match = _DRIVE_IMAGE.match(rel.replace(os.sep, "/"))
        if not match:
            continue
        set_dir = os.path.dirname(os.path.dirname(full))
        n, which = match["n"], match["set"]
        case_id = f"{n}_{which}"
        manual_dir = os.path.join(set_dir, "1st_manual")
        label = os.path.join(manual_dir, f"{n}_manual1.gif")
        mask = os.path.join(set_dir, "mask", f"{n}_{which}_mask.gif")
        if os.path.isdir(manual_dir) and not os.path.isfile(label):
            problems.append(CaseProblem(case_id, domain, (
                f"image {full} has no label: expected {label}")))
            continue
        if os.path.isdir(os.path.dirname(mask)) and not os.path.isfile(mask):
            problems.append(CaseProblem(case_id, domain, (
                f"image {full} has no field-of-view mask: expected {mask}")))
            continue
        cases.append(CaseRecord(case_id, domain, full,
                                label if os.path.isfile(label) else None,
                                mask if os.path.isfile(mask) else None, binarize_label=True))
    if not cases and not problems:
        raise LayoutError(
            f"{root} does not look like DRIVE: expected training/images/21_training.tif with "
            "training/1st_manual/21_manual1.gif and training/mask/21_training_mask.gif "
            "(and/or test/images/01_test.tif ...)"
        )
    return Listing("DRIVE", dict(VESSEL_LABELS), cases, problems)


# STARE (Hoover et al. 2000): im0001.ppm (or .ppm.gz as downloaded), vessel labels by two
# observers: labels-ah/im0001.ah.ppm (Adam Hoover) and labels-vk/im0001.vk.ppm (Valentina
# Kouznetsova); only 20 of the 397 pictures are labelled.
_STARE = re.compile(r"^(?P<case>im\d{4})(?:\.(?P<observer>ah|vk))?\.ppm(?:\.gz)?$")


@register_layout("stare")
def read_stare(root: str, default_domain: str | None = None, *,
               annotator: str = "ah") -> Listing:
    """Cases `im0001`, ... in one domain (`default_domain`, else `stare`); labelled by
    `annotator` (ah or vk) where that observer's label exists, unlabelled otherwise. Pictures
    and labels may share a folder or sit in stare-images/, labels-ah/, labels-vk/."""
    if annotator not in ("ah", "vk"):
        raise ValueError(f"--annotator must be ah or vk (STARE observers), got {annotator!r}")
    domain = default_domain or "stare"
    images, labels = {}, {}
    for _, full in walk_files(root):
        match = _STARE.match(os.path.basename(full))
        if not match:
            continue
        target = images if match["observer"] is None else labels
        if match["observer"] not in (None, annotator):
            continue
        if match["case"] in target:
            raise LayoutError(f"two files for {match['case']}: {target[match['case']]} "
                              f"and {full}")
        target[match["case"]] = full
    if not images:
        raise LayoutError(
            f"{root} does not look like STARE: expected pictures named im0001.ppm (or "
            f"im0001.ppm.gz) and labels im0001.{annotator}.ppm"
        )
    for case_id in sorted(set(labels) - set(images)):
        logging.warning("label %s has no picture; ignored", labels[case_id])
    cases = [CaseRecord(c, domain, p, labels.get(c), binarize_label=True)
             for c, p in sorted(images.items())]
    return Listing("STARE", dict(VESSEL_LABELS), cases, [])
