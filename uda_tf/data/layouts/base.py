"""Raw dataset layouts: each reader turns a directory into a list of cases.

A reader is registered by name (`@register_layout("msd")`) and called as
`reader(root, default_domain, **options) -> Listing`; its keyword-only parameters are its
options (e.g. the glob layout's `image_glob`). It only looks at file names and metadata;
reading voxels is `io.read_volume`'s job, later and in worker processes.

A case the reader can tell is broken (an image without the label it should have) is listed
under `Listing.problems`, not raised, so `prepare --skip_bad_cases` can report it and go on;
`read_layout` raises for the first one otherwise.

This module holds what every reader shares (the records, the registry, `read_layout`); the
readers are msd.py (`msd`), mri.py (`cc359`, `crossmoda`, `glob`) and retina.py (`drive`,
`stare`), registered when the package `uda_tf.data.layouts` is imported.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import re
from typing import Callable


DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class LayoutError(ValueError):
    """The input directory does not look like the requested layout."""


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One scan to prepare. `label_path` None = unlabelled. `mask_path`: an optional region
    of interest (DRIVE's field-of-view mask). `binarize_label`: the label file is a binary mask
    however it is stored (0/1, 0/255); see `io.read_volume(binarize=...)`.
    `channel_paths`: the files of input channels 1, 2, ... of a multi-channel scan (nnU-Net's
    <case>_0001, _0002, ...), on the grid of `image_path` (channel 0)."""

    case_id: str
    domain: str
    image_path: str
    label_path: str | None
    mask_path: str | None = None
    binarize_label: bool = False
    channel_paths: tuple[str, ...] = ()

    @property
    def image_paths(self) -> tuple[str, ...]:
        """Every input channel's file, channel 0 first."""
        return (self.image_path, *self.channel_paths)


@dataclasses.dataclass(frozen=True)
class CaseProblem:
    """A case a reader found broken before reading any voxels; `reason` names the files."""

    case_id: str
    domain: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a reader found: dataset name, label names {"0": "background", ...}, cases, and the
    cases it had to leave out (`problems`)."""

    name: str
    label_names: dict[str, str]
    cases: list[CaseRecord]
    problems: list[CaseProblem] = dataclasses.field(default_factory=list)


Reader = Callable[..., Listing]
LAYOUTS: dict[str, Reader] = {}


def register_layout(name: str) -> Callable[[Reader], Reader]:
    def wrap(reader: Reader) -> Reader:
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is already registered")
        LAYOUTS[name] = reader
        return reader

    return wrap


def layout_options(name: str) -> tuple[str, ...]:
    """The options (keyword-only parameters) the reader `name` accepts."""
    params = inspect.signature(LAYOUTS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def read_layout(name: str, root: str, default_domain: str | None = None, *,
                skip_bad_cases: bool = False, **options) -> Listing:
    """Lists the cases under `root` with the reader registered as `name`.

    `options` (None values are ignored) go to the reader; one it does not take is an error
    naming the layout's options. Problems the reader found raise LayoutError unless
    `skip_bad_cases`, in which case they stay in `Listing.problems`.
    """
    if name not in LAYOUTS:
        raise ValueError(
            f"unknown layout {name!r}; available layouts: {', '.join(sorted(LAYOUTS))}"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input directory not found: {root}")
    options = {k: v for k, v in options.items() if v is not None}
    accepted = layout_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"layout {name!r} does not take {', '.join(unknown)}; its options: "
            f"{', '.join(accepted) or 'none'}"
        )
    listing = LAYOUTS[name](root, default_domain, **options)
    if listing.problems and not skip_bad_cases:
        first = listing.problems[0]
        more = len(listing.problems) - 1
        raise LayoutError(
            first.reason + (f" (and {more} more such cases)" if more else "")
            + "; --skip_bad_cases leaves such cases out and reports them"
        )
    if not listing.cases:
        raise LayoutError(f"no usable cases found in {root} (layout {name!r})")
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
