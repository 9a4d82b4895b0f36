"""What identifies a patient stays out of prepared data unless asked for (`--keep_identifiers`).

Case ids usually come from file names, and file names in clinical exports are often patient
names or hospital numbers. Without `--keep_identifiers`, `prepare` replaces every case id by a
derived one, `<domain>_<k:04d>`, k being the case's position among its domain's cases in
sorted order, so derived ids sort like the originals and the train/val/test split (drawn from
the original ids) is the same either way. Derived rather than a salted hash: a hash of a
low-entropy name can be reversed by trying names, an index cannot.

What reaches the shards (the `case_id` feature), `manifest.json` (cases, split lists, skipped
cases), `skipped_cases.json`, and therefore the MLflow artifacts and the exported model's
`assets.extra/manifest.json`: derived ids only, and error reasons with the case's file paths
replaced by `<image>`, `<label>`, `<mask>`. NIfTI header text fields (`descrip`, `aux_file`,
`db_name`, `intent_name`) are never copied anywhere: only voxels and geometry are read.

Mapping results back: `--identifier_map=PATH` (outside the prepared directory) writes
{derived id: original id, image, label} for whoever may hold it; evaluation's metrics.csv rows
are keyed by derived id. `predict` works on files the user names and keeps their paths in its
own outputs.
"""
from __future__ import annotations

import collections
import dataclasses
import os

from uda_tf.data import layouts


def derived_ids(case_ids_by_domain: dict[str, list[str]]) -> dict[str, str]:
    """{original id: `<domain>_<k:04d>`}, k the position in the domain's sorted ids."""
    out = {}
    for domain, ids in sorted(case_ids_by_domain.items()):
        for k, case_id in enumerate(sorted(ids)):
            out[case_id] = f"{domain}_{k:04d}"
    return out


def scrub(text: str, case, original_id: str, derived_id: str) -> str:
    """`text` (an error reason) with the case's file paths and original id replaced."""
    channels = [(f"<image channel {k}>", p)
                for k, p in enumerate(getattr(case, "channel_paths", ()), start=1)]
    for name, path in (("<image>", getattr(case, "image_path", None)),
                       ("<label>", getattr(case, "label_path", None)),
                       ("<mask>", getattr(case, "mask_path", None)), *channels):
        if path:
            text = text.replace(path, name).replace(os.path.basename(path), name)
    return text.replace(original_id, derived_id)


def pseudonymize(cases, problems, assigned):
    """Cases, problems and the split assignment ({domain: {split: [ids]}}) with derived ids,
    plus {derived id: {"case_id", "image", "label"}} for an identifier map."""
    by_domain = collections.defaultdict(list)
    for item in [*cases, *problems]:
        by_domain[item.domain].append(item.case_id)
    rename = derived_ids(by_domain)
    mapping = {rename[c.case_id]: {"case_id": c.case_id, "image": c.image_path,
                                   "label": c.label_path,
                                   **({"channels": list(c.channel_paths)}
                                      if c.channel_paths else {})} for c in cases}
    mapping.update({rename[p.case_id]: {"case_id": p.case_id, "image": None, "label": None}
                    for p in problems})
    new_cases = [dataclasses.replace(c, case_id=rename[c.case_id]) for c in cases]
    new_problems = [layouts.CaseProblem(rename[p.case_id], p.domain,
                                        _scrub_problem(p.reason, p.case_id, rename[p.case_id]))
                    for p in problems]
    new_assigned = {d: {s: [rename[c] for c in ids] for s, ids in splits.items()}
                    for d, splits in assigned.items()}
    return new_cases, new_problems, new_assigned, mapping


def _scrub_problem(reason: str, original_id: str, derived_id: str) -> str:
    # A layout problem names files the reader looked for, not only the case's own paths:
    # keep only the words that name no path.
    words = [("<file>" if (os.sep in w or original_id in w) else w) for w in reason.split()]
    return " ".join(words).replace(original_id, derived_id)


def check_map_path(identifier_map: str | None, output_dir: str) -> None:
    """The identifier map must not land inside the prepared directory it is meant to keep
    clean."""
    if not identifier_map:
        return
    out = os.path.realpath(output_dir) + os.sep
    if os.path.realpath(identifier_map).startswith(out):
        raise ValueError(f"--identifier_map={identifier_map} lies inside --output_dir="
                         f"{output_dir}; put it where the prepared data is not shared")
