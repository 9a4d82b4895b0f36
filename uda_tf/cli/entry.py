"""How every uda_tf command line starts: define its flags, answer `--help`, run `main`.

absl's own `--help` lists the flags of the *main module* only, which for a console script
(`uda-train`) or a wrapper (`python train.py`) is a module that defines none, and exits 1.
`run` answers `--help` (also `-h`, `-?`, `--helpshort`) itself instead: what the program
does, then every flag the program defined, in definition order, under its section titles;
exit 0. `--helpfull` (absl's: every flag in the process, logging's included) is left to absl.
"""
from __future__ import annotations

import os
import sys
import textwrap
from typing import Callable, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
HELP_ARGS = frozenset({"--help", "-help", "--helpshort", "-helpshort", "-h", "-?"})
_WIDTH = 100

# A section list: (title, the flag the section starts at). Flags before the first start are
# listed under "flags".
Sections = Sequence[tuple[str, str]]


def asks_for_help(argv: Sequence[str]) -> bool:
    """Whether the command line (argv[0] is the program) holds a help switch before `--`."""
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg in HELP_ARGS:
            return True
    return False


def _flag_lines(flag) -> list[str]:
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    text = " ".join((flag.help or "").split())
    if flag.default_as_str:  # None: no default (a required flag, or an optional one)
        text += f" (default: {flag.default_as_str})"
    if isinstance(flag, flags.MultiFlag):
        text += " (repeatable)"
    return [f"  {name}"] + textwrap.wrap(text, _WIDTH, initial_indent="      ",
                                         subsequent_indent="      ")


def help_text(program: str, about: str, names: Sequence[str], sections: Sections) -> str:
    """The text `--help` prints: `about`, then the flags `names` (in that order) grouped
    under `sections`."""
    starts = {first: title for title, first in sections}
    unknown = sorted(set(starts) - set(names))
    if unknown:  # a section list that names a flag the program lacks: a programming error
        raise ValueError(f"help sections of {program} start at unknown flags {unknown}")
    lines = [f"usage: {program} [--flag=value ...]", "", textwrap.dedent(about).strip()]
    if names and names[0] not in starts:
        lines += ["", "flags:"]
    for name in names:
        if name in starts:
            lines += ["", f"{starts[name]}:"]
        lines += _flag_lines(FLAGS[name])
    lines += [""] + textwrap.wrap(
        "--flagfile=FILE reads flags from FILE, one per line (a later flag wins); --helpfull "
        "also lists absl's own flags (logging, ...).", _WIDTH)
    return "\n".join(lines)


def program_name() -> str:
    """How the user started this program: `python -m <module>`, or the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0]) or "uda_tf"


def run(main: Callable, define_flags: Callable[[], object], about: str,
        sections: Sections | Callable[[], Sections] = ()) -> None:
    """Defines the program's flags, prints `help_text` and exits 0 when asked for help, and
    otherwise parses the command line and runs `main` through `absl.app.run`."""
    before = set(FLAGS)
    define_flags()
    if asks_for_help(sys.argv):
        names = [n for n in FLAGS if n not in before and FLAGS[n].name == n]
        print(help_text(program_name(), about, names,
                        sections() if callable(sections) else sections))
        sys.exit(0)
    app.run(main)
