"""Atomic file writes: a crash leaves the previous good file, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable


_UMASK = os.umask(0o022)
os.umask(_UMASK)
TMP_SUFFIX = ".nnperf-tmp"
_TMP_NAME = re.compile(r"\..+\.(\d+)\.[A-Za-z0-9_]+" + re.escape(TMP_SUFFIX))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove temporary files that an interrupted atomic write left in `folder` (only ours: the
    name pattern of atomic_path, written by a process that no longer runs). Returns what went."""
    folder = Path(folder)
    removed = []
    candidates = folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}")
    for p in candidates:
        m = _TMP_NAME.fullmatch(p.name)
        if m is None or p.is_symlink() or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue  # its writer may be writing it right now
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def describe_os_error(e: OSError) -> str:
    """One line for a failing environment: what happened to which file, and what to do about it."""
    where = e.filename if e.filename is not None else "a file"
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on the device; free some space (or choose another output folder) and run again"
    if e.errno == errno.EROFS:
        return f"{where}: the file system is read-only; choose a writable output folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose a folder you can write to, or fix its permissions"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a path component is a file, not a folder; choose another path"
    if e.errno == errno.EISDIR:
        return f"{where}: is a folder, not a file; give a file name"
    return f"{where}: {what}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the same folder; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the name so that a later start can tell an abandoned one (clean_stale_temps).
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:  # name the file asked for, not the temporary one that could not be made
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result is an ordinary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = _os_error_behind(e, path) if isinstance(e, Exception) else None
        if failed is not None:
            raise failed from None
        raise


def _os_error_behind(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write (libraries such as torch.save wrap it in a RuntimeError),
    naming the file the user asked for rather than the temporary one beside it."""
    seen: BaseException | None = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__context__ or seen.__cause__
    if seen is None or seen.errno is None:
        return None
    return OSError(seen.errno, seen.strerror or str(seen), str(path))


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the folder entry itself is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Atomically write `path` by calling `writer(tmp_path)`."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_stream(path: str | os.PathLike, writer: Callable[[Any], Any]) -> None:
    """Atomically write `path` by calling `writer(binary_file)`: an error of the disk then reaches the
    caller as the OSError it is (torch.save given a path reports a full disk as a RuntimeError)."""
    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            writer(f)
    write_with(path, to_file)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines, skipping a torn or blank line (a crash can leave one at the end)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# What every nnperf checkpoint's "format" says (train/checkpoint.py writes them; models/ reads their weights).
CHECKPOINT_FORMAT = "nnperf-checkpoint/1"


def read_torch(path: str | Path, flag: str) -> object:
    """Whatever a torch file holds, read safely (weights_only: no code runs), or a one-line error
    naming `flag` and the file."""
    import torch

    from .errors import UsageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: {'not a regular file' if p.exists() else 'no such file'}")
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a bad file; all mean the same
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if reason.startswith("Weights only load failed"):
            reason = "not a torch file, or one holding objects that a safe load refuses"
        elif len(reason) < 12:  # a bare byte value or key from the unpickler says nothing
            reason = f"not a torch file ({type(e).__name__}{': ' + reason if reason else ''})"
        raise UsageError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt? {reason[:160]})") from None
