"""Names that become paths: run names, study names, and names that come from data files.

A name given by the user (`--name`, `--study`) is checked and refused with one line; a name that
comes from data (a metric key in a JSONL file, a class name) is made safe instead, because the
user cannot rename it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UsageError

NAME_RULE = ("letters, digits, '_', '-', '+', '=', ',', '@' and '.' (not first), at most 128 characters, "
             "no '/' or spaces")
_NAME = re.compile(r"[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,@-]+")


def check_name(value: object, flag: str) -> str:
    """`value` if it is a usable single folder or file name, else a one-line UsageError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else f"a value of type {type(value).__name__}"
        raise UsageError(f"{flag}: {shown} is not a usable name (use {NAME_RULE})")
    return value


def safe_component(text: object, fallback: str = "unnamed") -> str:
    """A file-name-safe version of a name read from data: unsafe runs become '_', no leading dot."""
    cleaned = _UNSAFE.sub("_", str(text)).lstrip(".")[:128]
    return cleaned or fallback


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` (resolved, links followed) lies inside `folder` (resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def refuse_overwriting_inputs(outputs: dict[str, str | os.PathLike | None], inputs: list) -> None:
    """One line if an output path (keyed by its flag) is one of the files or folders read."""
    read = {Path(p).resolve() for p in inputs}
    for flag, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        if target in read:
            raise UsageError(f"{flag} {out}: that is one of the inputs; choose another output path")
