"""How every uda_tf command line starts: define its flags, answer `--help`, run `main`.

absl's own `--help` lists the flags of the *main module* only, which for a console script
(`uda-train`) or a wrapper (`python train.py`) is a module that defines none, and exits 1.
`run` answers `--help` (also `-h`, `-?`, `--helpshort`) itself instead: what the program
does, then every flag the program defined, in definition order, under its section titles;
exit 0. `--helpfull` (absl's: every flag in the process, logging's included) is left to absl.

It also reads the flagfiles itself (`expand_flagfiles`) before absl parses the command line:
`--flagfile=uda:NAME` names a config that ships with uda_tf (uda_tf/configs/NAME.cfg), and in
a flagfile a relative path, that of a nested `--flagfile` or the value of a flag naming a file
or folder (`*_dir`, `*_file`, `*_map`, `*_checkpoint`, `*_path`), is relative to that
flagfile's folder, wherever the command runs. On the command line itself, relative paths stay
relative to the working directory.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import Callable, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
HELP_ARGS = frozenset({"--help", "-help", "--helpshort", "-helpshort", "-h", "-?"})
PACKAGED = "uda:"  # --flagfile=uda:NAME: a config shipped in uda_tf/configs
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs")
PATH_FLAG = re.compile(r"^--?(\w+_(?:dir|file|map|checkpoint|path))=(.*)$")
_FLAGFILE = re.compile(r"^--?flagfile=(.*)$")
_WIDTH = 100

# A section list: (title, the flag the section starts at). Flags before the first start are
# listed under "flags".
Sections = Sequence[tuple[str, str]]


class FlagfileError(ValueError):
    """A flagfile that cannot be read: missing, unknown packaged name, or a cycle."""


def packaged_configs() -> list[str]:
    """The names `--flagfile=uda:NAME` takes."""
    return sorted(n[:-4] for n in os.listdir(CONFIG_DIR) if n.endswith(".cfg"))


def resolve_flagfile(value: str, base_dir: str | None = None) -> str:
    """The file `--flagfile=value` reads: uda:NAME (shipped), an absolute path, or a path
    relative to `base_dir` (the including flagfile's folder; None: the working directory)."""
    if value.startswith(PACKAGED):
        name = value[len(PACKAGED):]
        path = os.path.join(CONFIG_DIR, f"{name}.cfg")
        if not re.fullmatch(r"[\w.-]+", name) or not os.path.isfile(path):
            raise FlagfileError(f"--flagfile={value}: no config {name!r} ships with uda_tf; "
                                f"there are: {', '.join(packaged_configs())}")
        return path
    if os.path.isabs(value) or base_dir is None:
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def _flagfile_lines(path: str) -> list[str]:
    """The flag lines of a flagfile (absl's rules: blank lines and lines starting with # or
    // are left out)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise FlagfileError(f"--flagfile={path}: cannot read it ({e})") from None
    return [line for line in lines if line and not line.startswith(("#", "//"))]


def expand_flagfiles(args, base_dir: str | None = None, _stack=()) -> list[str]:
    """`args` with every --flagfile replaced by its lines, recursively (module docstring:
    packaged names, and paths relative to the flagfile that holds them). Arguments after a
    bare `--` are left as they are."""
    out, args = [], list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            return out + args[i - 1:]
        if arg in ("--flagfile", "-flagfile") and i < len(args):  # --flagfile FILE
            arg = f"--flagfile={args[i]}"
            i += 1
        match = _FLAGFILE.match(arg)
        if match:
            path = resolve_flagfile(match.group(1), base_dir)
            real = os.path.realpath(path)
            if real in _stack:
                raise FlagfileError(f"--flagfile={match.group(1)}: {path} includes itself")
            folder = os.path.dirname(os.path.abspath(path))
            out += expand_flagfiles(_flagfile_lines(path), folder, (*_stack, real))
            continue
        path_flag = PATH_FLAG.match(arg) if base_dir is not None else None
        if path_flag and path_flag.group(2) and not os.path.isabs(path_flag.group(2)) \
                and "://" not in path_flag.group(2):
            value = os.path.normpath(os.path.join(base_dir, path_flag.group(2)))
            arg = arg[: len(arg) - len(path_flag.group(2))] + value
        out.append(arg)
    return out


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
    try:
        argv = [sys.argv[0], *expand_flagfiles(sys.argv[1:])]
    except FlagfileError as e:
        print(f"{program_name()}: error: {e}", file=sys.stderr)
        sys.exit(1)
    if asks_for_help(argv):
        names = [n for n in FLAGS if n not in before and FLAGS[n].name == n]
        print(help_text(program_name(), about, names,
                        sections() if callable(sections) else sections))
        sys.exit(0)
    app.run(main, argv=argv)
