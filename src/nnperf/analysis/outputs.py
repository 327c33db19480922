"""Where the analysis commands write, checked before anything is written: an output path that is a
folder where a file belongs (or the reverse), or that is one of the files read, is one line and
exit 2, and no input is ever replaced. A write that the file system refuses (a read-only folder, a
full disk) names the output, not the temporary file beside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import fileio, names
from ..errors import UsageError

# Files of a run directory that the analysis commands read besides the logs.
RUN_FILES = ("config.yaml", "env.json", "test.json")


def read_paths(srcs: Iterable, given: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every file and folder an analysis of `srcs` (logs.Source) reads, and the paths as given."""
    read = [Path(p) for p in given]
    for src in srcs:
        read += list(src.telemetry) + ([src.metrics] if src.metrics else [])
        if src.run_dir is not None:
            read += [src.run_dir, src.run_dir / "telemetry"] + [src.run_dir / f for f in RUN_FILES]
    return read


def _file_on_the_way(path: Path) -> Path | None:
    """The first existing parent of `path` that is not a folder (writing below it cannot work)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def file_target(flag: str, path: str | os.PathLike, inputs: list[Path] = (), example: str = "out") -> Path:
    """`path` checked as an output file: not a folder, no file in its way, not one of `inputs`."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name (such as {path / example})")
    blocking = _file_on_the_way(path)
    if blocking is not None:
        raise UsageError(f"{flag} {path}: {blocking} is a file, not a folder; choose another path")
    names.refuse_overwriting_inputs({flag: path}, list(inputs))
    return path


def folder_target(flag: str, path: str | os.PathLike) -> Path:
    """`path` checked as an output folder: not a file, no file in its way. It may be an input
    folder (plots beside the run's logs); refuse_writing_over checks the files that go into it."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder; give a folder to write into")
    blocking = _file_on_the_way(path)
    if blocking is not None:
        raise UsageError(f"{flag} {path}: {blocking} is a file, not a folder; choose another path")
    return path


def refuse_writing_over(flag: str, folder: Path, planned: list[Path], inputs: list[Path]) -> None:
    """One line if a file to be written into `folder` would replace an input or an existing folder."""
    read = {p.resolve() for p in inputs}
    for path in planned:
        if path.resolve() in read:
            raise UsageError(f"{flag} {folder}: writing {path.name} there would replace {path}, one of the "
                             "inputs; choose another output folder")
        if path.is_dir():
            raise UsageError(f"{flag} {folder}: {path} is a folder where {path.name} would be written; "
                             "choose another output folder")


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """fileio.write_with (whose errors name `path`), after removing what an interrupted earlier write
    left beside it."""
    if Path(path).parent.is_dir():
        fileio.clean_stale_temps(Path(path).parent, recursive=False)
    fileio.write_with(path, writer)
