"""A per-device cache of measurements (peak FLOP/s, later the precision/memory-format policy).

One JSON file per (kind, device key) under `$NNPERF_CACHE`, else `$XDG_CACHE_HOME/nnperf`, else
`~/.cache/nnperf`: `<root>/<kind>/<device name>-<hash of the key>.json`. The key holds what the
figures depend on (device, torch and driver versions, CPU ISA, threads), so an upgrade or another
GPU measures again instead of reading figures that no longer hold.

A cache is only ever a shortcut: a torn, corrupt or unreadable file is ignored with one warning,
and a folder that cannot be written (a read-only home) means no caching, never a failed command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__, fileio, names
from .. import device as devices

# ISA extensions that decide how fast a CPU multiplies matrices (oneDNN picks kernels by them).
_ISA = re.compile(r"avx2|avx512.*|amx.*|fma|f16c|sve.*|asimd.*|neon")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_warned: set[str] = set()


def cache_dir() -> Path:
    """The cache's root folder: $NNPERF_CACHE, else $XDG_CACHE_HOME/nnperf, else ~/.cache/nnperf."""
    if os.environ.get("NNPERF_CACHE"):
        return Path(os.environ["NNPERF_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "nnperf"
    return Path.home() / ".cache" / "nnperf"


def device_key(dev: torch.device) -> dict:
    """What measurements on `dev` depend on: its name, torch's version, and for a GPU the CUDA/HIP
    version, driver, architecture and unit count; for the CPU its model, ISA flags and torch threads."""
    key = {"type": dev.type, "name": devices.device_name(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        key.update(_gpu_key(dev))
    elif dev.type == "cpu":
        key["isa"] = sorted(f for f in devices.cpu_flags() if _ISA.fullmatch(f))
        key["threads"] = torch.get_num_threads()
        with contextlib.suppress(Exception):  # absent in old torch versions
            key["capability"] = torch.backends.cpu.get_cpu_capability()
    return key


def _gpu_key(dev: torch.device) -> dict:
    props = torch.cuda.get_device_properties(dev)
    key = {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
           "units": getattr(props, "multi_processor_count", None),
           "memory_bytes": getattr(props, "total_memory", None),
           "arch": (getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}").split(":")[0]}
    with contextlib.suppress(Exception):  # private API: absent on some builds
        key["driver"] = torch._C._cuda_getDriverVersion()
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def path_for(kind: str, key: dict) -> Path:
    """Where the entry of `kind` for `key` lives (whether or not it exists)."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"cache kind {kind!r}: use lower-case letters, digits and '_'")
    label = names.safe_component(str(key.get("name", "device")).replace(" ", "_"))[:48]
    return cache_dir() / kind / f"{label}-{key_digest(key)}.json"


def warn_once(message: str) -> None:
    """Print `message` to stderr the first time it comes up in this process."""
    if message not in _warned:
        _warned.add(message)
        print(f"nnperf cache: {message}", file=sys.stderr)


def get_entry(kind: str, key: dict) -> dict | None:
    """The stored entry ({"value", "written_at", ...}) of `kind` for `key`, or None if there is none
    or it cannot be read (which is warned about once, then treated as absent)."""
    path = path_for(kind, key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn_once(f"{path}: unreadable ({type(e).__name__}: {str(e)[:120]}); ignored, measuring again")
        return None
    if not isinstance(entry, dict) or "value" not in entry or entry.get("key") != key:
        warn_once(f"{path}: not a cache entry for this device; ignored, measuring again")
        return None
    return entry


def get(kind: str, key: dict, default: Any = None) -> Any:
    """The value stored for (kind, key), or `default`."""
    entry = get_entry(kind, key)
    return default if entry is None else entry["value"]


def put(kind: str, key: dict, value: Any) -> Path | None:
    """Store `value` (JSON-serialisable) for (kind, key) atomically; the path, or None where the
    cache folder cannot be written (warned about once: the value is then simply not cached)."""
    path = path_for(kind, key)
    entry = {"kind": kind, "key": key, "value": value, "written_at": time.time(), "nnperf": __version__}
    try:
        if path.parent.is_dir():
            fileio.clean_stale_temps(path.parent, recursive=False)
        fileio.write_json(path, entry)
    except OSError as e:
        warn_once(f"cannot write {path} ({fileio.describe_os_error(e)}); figures are not cached")
        return None
    return path
