"""The sweep spec: a YAML file that says what to train and which settings to search.

    study: optimizers            # study name (--study overrides)
    trials: 21                   # trials in all, shared by every worker (default: the grid's size, else 20)
    sampler: tpe                 # tpe or random, for the `space` parameters
    seed: 0                      # the sampler's seed
    pruner: {type: median, startup_trials: 5, warmup_epochs: 1}   # or {type: none}
    base:                        # nnperf train settings of every trial (a --config preset's keys)
      dataset: fashion-mnist
      epochs: 3
    grid:                        # points run first: each entry's lists are crossed
      - {optimizer: sgd, lr: [0.01, 0.03, 0.1]}
    space:                       # searched by the sampler in the remaining trials
      weight_decay: {type: log-float, low: 1.0e-5, high: 1.0e-2}
      batch_size: {type: int, low: 64, high: 256, step: 64}
      label_smoothing: {type: float, low: 0.0, high: 0.2}
      schedule: {type: categorical, choices: [cosine, onecycle]}
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as configs
from ..errors import UsageError

KEYS = {"study", "trials", "sampler", "seed", "pruner", "base", "grid", "space", "metric"}
TYPES = {"categorical", "int", "float", "log-float"}
PRUNERS = {"median", "percentile", "none"}


@dataclass
class Param:
    name: str
    type: str
    choices: list = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    step: float | None = None


@dataclass
class Spec:
    path: Path
    study: str
    trials: int
    sampler: str
    seed: int
    pruner: dict
    base: dict
    grid: list[dict]
    space: dict[str, Param]
    raw: dict

    @property
    def fingerprint(self) -> str:
        """Identifies the search (not the trial count), so a study name cannot silently be reused
        for a different sweep."""
        search = {k: self.raw.get(k) for k in ("base", "grid", "space", "sampler", "pruner", "metric")}
        return hashlib.sha256(json.dumps(search, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fail(path: Path, where: str, message: str) -> UsageError:
    return UsageError(f"{path}: {where}: {message}")


def _check_settings(path: Path, where: str, values: dict) -> None:
    known = {f.name for f in configs.fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise _fail(path, where, f"unknown setting(s) {', '.join(unknown)} (see nnperf train --help)")
    try:
        configs.build({}, values)
    except UsageError as e:
        raise _fail(path, where, str(e)) from None


def _param(path: Path, name: str, body) -> Param:
    where = f"space.{name}"
    if not isinstance(body, dict) or body.get("type") not in TYPES:
        raise _fail(path, where, f"needs type: one of {', '.join(sorted(TYPES))}")
    extra = set(body) - {"type", "choices", "low", "high", "step"}
    if extra:
        raise _fail(path, where, f"unknown key(s) {', '.join(sorted(extra))}")
    p = Param(name, body["type"], list(body.get("choices") or []), body.get("low"), body.get("high"), body.get("step"))
    if p.type == "categorical":
        if not p.choices:
            raise _fail(path, where, "categorical needs a non-empty choices list")
        return p
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (p.low, p.high)):
        raise _fail(path, where, f"{p.type} needs numbers low and high")
    if p.low >= p.high:
        raise _fail(path, where, f"impossible range: low {p.low} is not below high {p.high}")
    if p.type == "log-float" and p.low <= 0:
        raise _fail(path, where, f"log-float needs low > 0, got {p.low}")
    if p.type == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
        raise _fail(path, where, "int needs whole-number low and high")
    if p.step is not None and (p.step <= 0 or p.step > p.high - p.low or p.type == "log-float"):
        raise _fail(path, where, f"step {p.step} does not fit the range (and log-float takes no step)")
    return p


def grid_points(path: Path, grid) -> list[dict]:
    """Each grid entry's lists crossed into points: {optimizer: sgd, lr: [a, b]} -> 2 points."""
    if grid is None:
        return []
    if not isinstance(grid, list) or not all(isinstance(g, dict) and g for g in grid):
        raise _fail(path, "grid", "must be a list of mappings (setting: value or [values])")
    points = []
    for i, entry in enumerate(grid):
        keys = list(entry)
        values = [v if isinstance(v, list) else [v] for v in entry.values()]
        if any(not v for v in values):
            raise _fail(path, f"grid[{i}]", "an empty list of values")
        points += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return points


def load(path: str | Path, study: str | None = None) -> Spec:
    path = Path(path)
    raw = configs.read_yaml_mapping(path, f"SPEC {path}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)} (expected {', '.join(sorted(KEYS))})")
    if raw.get("metric", "top1") != "top1":
        raise _fail(path, "metric", "only top1 (validation top-1, maximised) is supported")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise _fail(path, "base", "must be a mapping of nnperf train settings")
    _check_settings(path, "base", base)
    points = grid_points(path, raw.get("grid"))
    for i, point in enumerate(points):
        _check_settings(path, f"grid point {i} {point}", {**base, **point})
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise _fail(path, "space", "must be a mapping of setting: {type: ..., ...}")
    space = {name: _param(path, name, body) for name, body in space_raw.items()}
    for name, p in space.items():
        ends = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in ends:
            _check_settings(path, f"space.{name}", {**base, name: int(value) if p.type == "int" else value})
    clash = sorted({k for pt in points for k in pt} & set(space))
    if clash:
        raise _fail(path, "space", f"{', '.join(clash)} also in grid; a setting is either gridded or searched")
    trials = raw.get("trials", len(points) or 20)
    if not isinstance(trials, int) or trials < max(1, len(points)):
        raise _fail(path, "trials", f"must be a whole number, at least the grid's {len(points)} points")
    if trials > len(points) and not space:
        raise _fail(path, "trials", f"{trials} trials but only {len(points)} grid points and no space to search")
    sampler = raw.get("sampler", "tpe")
    if sampler not in ("tpe", "random"):
        raise _fail(path, "sampler", f"unknown sampler '{sampler}' (tpe or random)")
    pruner = raw.get("pruner") or {"type": "median"}
    if not isinstance(pruner, dict) or pruner.get("type", "median") not in PRUNERS:
        raise _fail(path, "pruner", f"type must be one of {', '.join(sorted(PRUNERS))}")
    name = study or raw.get("study") or path.stem
    return Spec(path, str(name), trials, sampler, int(raw.get("seed", 0)), pruner, base, points, space, raw)
