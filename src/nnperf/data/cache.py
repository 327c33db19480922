"""On-disk cache of decoded datasets (uint8 tensors), so a second run skips decoding."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..fileio import write_stream


def default_dir() -> Path:
    return Path(os.environ.get("NNPERF_CACHE", Path.home() / ".cache" / "nnperf"))


def file_fingerprint(paths: list[Path]) -> list:
    """Name, size and modification time of each file: changes when any file changes."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cached(cache_dir: str | os.PathLike | None, key: object, build: Callable[[], dict]) -> dict:
    """Return `build()`'s dict of tensors and lists, from the cache when `key` was seen before.

    A cache file that cannot be read (torn by a crash, older format) is rebuilt.
    """
    folder = Path(cache_dir) if cache_dir else default_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = folder / "decoded" / f"{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable cache file is simply rebuilt
            pass
    value = build()
    try:
        write_stream(path, lambda f: torch.save(value, f))
    except OSError:
        pass  # a read-only or full cache folder costs only speed
    return value
