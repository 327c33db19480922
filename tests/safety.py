"""Harness for the table-driven bad-input and fault tests (tests/test_safety_*.py).

Every case runs `nnperf ARGS` from a folder two levels below the test's root, so that a path
escaping the folder it was given (`--name ../../x`) still lands where the checksums see it. The
case states the exit status, words the one line on stderr must contain, and the files (globs,
relative to the root) it may create or change; every other file under the root must keep its
exact bytes, and no file may appear or vanish outside those globs.

Case ids are "KIND-what": README.md's count of cases by kind comes from
`pytest tests/ --collect-only -q -k safety` grouped by KIND.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("overwrite", "names", "datafile", "environment", "divergence", "input", "interrupt", "telemetry")


@dataclass
class Case:
    id: str                               # "KIND-what"
    args: list[str]                       # nnperf arguments (run from ROOT/work/here)
    code: int                             # expected exit status
    needles: tuple[str, ...] = ()         # words the one stderr line must contain (error cases)
    may_change: tuple[str, ...] = ()      # globs relative to ROOT of files it may create or change
    setup: Callable[[Path], None] | None = None  # prepares ROOT before the run (called with ROOT)
    one_line: bool = True                 # a failing case prints exactly one line on stderr

    def __post_init__(self):
        assert self.id.split("-")[0] in KINDS, self.id


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative posix path -> digest); folders as 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def allowed(path: str, globs: tuple[str, ...]) -> bool:
    # A folder that holds an allowed file may appear too (a new run directory, say).
    return any(fnmatch.fnmatch(path, g) or any(fnmatch.fnmatch(path, prefix) for prefix in _parents(g))
               for g in globs)


def _parents(glob: str) -> list[str]:
    parts = glob.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


ALWAYS = ("cache", "cache/*", "cache/**")  # the decoded-dataset cache NNPERF_CACHE points at


def check(run_cli, root: Path, case: Case) -> tuple[int, str, str]:
    """Run the case from ROOT/work/here and assert its promises; returns (code, out, err)."""
    here = root / "work" / "here"
    here.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(root)
    before = digest(root)
    old = os.getcwd()
    os.chdir(here)
    try:
        code, out, err = run_cli(*case.args)
    finally:
        os.chdir(old)
    after = digest(root)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == case.code, (code, out, err)
    if case.code != 0 and case.one_line:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1, err
        for needle in case.needles:
            assert needle in lines[0], (needle, lines[0])
    else:
        for needle in case.needles:
            assert needle in out + err, (needle, out, err)
    unexpected = sorted(p for p in changed(before, after) if not allowed(p, case.may_change + ALWAYS))
    assert not unexpected, f"{case.id} changed files it had no business with: {unexpected}"
    return code, out, err


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "4m"):
    """A small tmpfs mounted on `folder` (made if missing) for disk-full and read-only cases; skips
    the test with the reason where mounting is not allowed (not root, no mount namespace)."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, read_only: bool) -> None:
    subprocess.run(["mount", "-o", "remount," + ("ro" if read_only else "rw"), str(folder)], check=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system of `folder` until about `leave_bytes` are free; returns the filler file."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free - leave_bytes
    with open(filler, "wb") as f:
        while free > 0:
            chunk = min(free, 1 << 20)
            try:
                f.write(b"\0" * chunk)
                f.flush()
            except OSError:
                break
            free -= chunk
    return filler
