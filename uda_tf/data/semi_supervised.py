"""A few labelled target cases in the supervised loss (semi-supervised adaptation).

The user names target training cases whose labels may be used (`--target_labelled_cases`);
each training batch then carries `--target_labelled_per_batch` labelled target slices (or
patches) in place of as many source ones (`pipeline.train_dataset(labelled_target=...)`), so
the global batch size, and with it the replica split, is unchanged. Every other target label
stays unread: the stream is filtered to the named cases before parsing, and evaluation of
target val/test cases is unaffected (they are other cases).
"""
from __future__ import annotations


def resolve_cases(manifest: dict, domain: str, spec: str) -> list[str]:
    """Case ids from `spec`: a comma list of target training case ids, or a count N (the first
    N labelled training cases of `domain` in sorted order, so runs are repeatable)."""
    train = manifest["domains"][domain]["cases"].get("train", [])
    labelled = sorted(c for c in train if manifest["cases"].get(c, {}).get("has_label"))
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= len(labelled):
            raise ValueError(f"--target_labelled_cases={spec}: the target domain {domain!r} has "
                             f"{len(labelled)} labelled training cases; ask for 1 to "
                             f"{len(labelled)}")
        return labelled[:n]
    cases = [c.strip() for c in spec.split(",") if c.strip()]
    bad = [c for c in cases if c not in labelled]
    if bad or not cases:
        raise ValueError(f"--target_labelled_cases: {bad or spec!r} are not labelled training "
                         f"cases of target domain {domain!r}; those are: {labelled}")
    return sorted(set(cases))
