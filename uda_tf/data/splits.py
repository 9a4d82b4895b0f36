"""Train/val/test assignment of cases: deterministic per domain, or read from a split file."""
from __future__ import annotations

import json
import zlib

import numpy as np

SPLITS = ("train", "val", "test")
# Unlabelled cases of a domain that has labels (MSD imagesTs/): never trained on as if labelled,
# never scored; kept for self-training or prediction.
UNLABELLED = "unlabelled"


def split_cases(case_ids, fractions, seed: int, domain: str) -> dict[str, list[str]]:
    """Deterministic train/val/test assignment of one domain's cases.

    Sorted ids are shuffled with a generator seeded by (seed, domain), then cut by
    largest-remainder counts; with >= 3 cases every split with a non-zero fraction gets one.
    """
    ids = sorted(case_ids)
    n = len(ids)
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:
        for i in range(3):
            if fractions[i] > 0 and counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    order = [ids[i] for i in rng.permutation(n)]
    bounds = np.cumsum([0] + counts)
    return {s: sorted(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def read_split_file(path: str) -> dict[str, str]:
    """{case_id: split} from a JSON file; errors name the file and the offending entry."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"--split_file={path}: cannot read it: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--split_file={path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--split_file={path} must hold a JSON object {{case_id: split}}")
    allowed = (*SPLITS, UNLABELLED)
    for case_id, split in data.items():
        if split not in allowed:
            raise ValueError(f"--split_file={path}: case {case_id!r} has split {split!r}; "
                             f"allowed: {', '.join(allowed)}")
    return dict(data)


def check_known(split_file: dict, known, where: str, dataset: str) -> None:
    """A split file names only cases of this dataset: an id matching no case is most likely a
    split file for another dataset (or other ids), which would otherwise pass unnoticed."""
    unknown = sorted(c for c in split_file if c not in set(known))
    if unknown:
        raise ValueError(
            f"{where} names cases {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
            f"({len(unknown)} of {len(split_file)}) that are not in {dataset}; a split file "
            "must describe this dataset's cases (ids as the layout reads them)")


def assign_splits(cases_by_domain: dict, fractions, seed: int,
                  split_file: dict | None = None, where: str = "--split_file"):
    """{domain: {split: [case ids]}} for {domain: [(case_id, labelled)]}.

    In a domain with any labelled case, its unlabelled cases go to UNLABELLED; a domain with
    no labels at all (a UDA target) is split like a labelled one. A split file must name every
    case; it may not put an unlabelled case of a labelled domain into train/val/test.
    """
    out = {}
    for domain, members in sorted(cases_by_domain.items()):
        has_labels = any(labelled for _, labelled in members)
        pool = [c for c, labelled in members if labelled or not has_labels]
        spare = sorted(c for c, labelled in members if has_labels and not labelled)
        if split_file is None:
            splits = split_cases(pool, fractions, seed, domain)
        else:
            missing = sorted(c for c in pool if c not in split_file)
            if missing:
                raise ValueError(f"{where} does not assign cases {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''} of domain {domain!r}")
            splits = {s: sorted(c for c in pool if split_file[c] == s) for s in SPLITS}
            wrong = sorted(c for c in pool if split_file[c] == UNLABELLED)
            if wrong and has_labels:
                raise ValueError(f"{where} puts labelled cases {wrong[:5]} into "
                                 f"{UNLABELLED!r}")
            if wrong:  # an all-unlabelled domain
                raise ValueError(f"{where} puts cases {wrong[:5]} of domain {domain!r} into "
                                 f"{UNLABELLED!r}; use train/val/test for a domain without labels")
            bad = sorted(c for c in spare if split_file.get(c, UNLABELLED) != UNLABELLED)
            if bad:
                raise ValueError(
                    f"{where} puts unlabelled cases {bad[:5]} of labelled domain {domain!r} "
                    f"into a training/evaluation split; they can only be {UNLABELLED!r}")
        if spare:
            splits[UNLABELLED] = spare
        out[domain] = splits
    return out
