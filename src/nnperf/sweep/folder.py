"""The sweep folder: one study's trial runs, its results table and (by default) its SQLite database.

Trials are run directories named by trial number (trial0000, ...), and a trial replaces a run
directory of its name that a crash left behind. Two studies in one folder would therefore replace
each other's trials, and a folder of other files (`--out-dir runs`) could lose a run that happens
to be called trial0000, or a results.csv. So the folder records its study in sweep.json when the
sweep first uses it, and a sweep refuses a folder that belongs to another study or holds anything
that is not a sweep's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UsageError
from ..fileio import write_json

MARKER = "sweep.json"
# What a sweep writes into its folder (and SQLite's side files, and atomic-write leftovers); a
# folder without the marker that holds only these was made by an nnperf sweep before the marker.
_FILES = re.compile(r"study\.db(-journal|-wal|-shm)?|results\.csv|sweep\.json|\..+\.nnperf-tmp")
_TRIAL = re.compile(r"trial\d+")


def check(folder: Path, study: str, flag: str) -> bool:
    """Refuse (before anything is written) a folder that is another study's or not a sweep's;
    returns whether it still needs its marker (claim)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: is a file, not a folder; choose another --out-dir")
    marker = folder / MARKER
    if marker.exists():
        theirs = _owner(marker, flag)
        if theirs != study:
            raise UsageError(f"{flag} {folder}: holds the trials of study {theirs!r}, not {study!r}; choose "
                             "another --out-dir (or --study for that study)")
        return False
    if folder.is_dir():
        entries = list(folder.iterdir())
        foreign = sorted(p.name for p in entries if not _ours(p))
        if entries and not foreign and not any(p.name == "study.db" or _TRIAL.fullmatch(p.name) for p in entries):
            foreign = sorted(p.name for p in entries)  # a results.csv alone is anybody's
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UsageError(f"{flag} {folder}: holds files that are not a sweep's ({shown}); they are left "
                             "alone: choose a new or empty --out-dir")
    return True


def _ours(p: Path) -> bool:
    if p.is_symlink():
        return False  # a trial would be replaced through it
    return bool(_TRIAL.fullmatch(p.name) and p.is_dir() or _FILES.fullmatch(p.name) and p.is_file())


def _owner(marker: Path, flag: str) -> str:
    try:
        study = json.loads(marker.read_text(encoding="utf-8")).get("study")
    except (ValueError, AttributeError):
        study = None
    if not isinstance(study, str):
        raise UsageError(f"{flag} {marker.parent}: its {MARKER} is unreadable; it is not a sweep folder "
                         "this nnperf can use: choose another --out-dir") from None
    return study


def claim(folder: Path, study: str, flag: str, studies_here: list[str] | None) -> None:
    """Mark the folder as `study`'s. `studies_here`: the studies in its own SQLite database, when
    the sweep uses that one: a folder from before the marker may hold another study's trials."""
    others = sorted(set(studies_here or ()) - {study})
    if others:
        raise UsageError(f"{flag} {folder}: holds the trials of study {others[0]!r}, not {study!r}; choose "
                         "another --out-dir (or --study for that study)")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MARKER, {"study": study})
