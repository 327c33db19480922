"""The sweep spec: a YAML file that says what to train and which settings to search.

    study: optimizers            # study name (--study overrides); also the sweep folder's name
    trials: 21                   # trials in all, shared by every worker (default: the grid's size, else 20)
    sampler: tpe                 # tpe or random, for the `space` parameters
    seed: 0                      # the sampler's seed
    pruner: {type: median, startup_trials: 5, warmup_epochs: 1}   # or {type: none}
    nproc: 1                     # processes per trial (nnperf train --nproc N; such trials are not pruned)
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

Every value is checked here, before anything is written: a bad spec is one line naming the file
and the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as configs
from ..errors import UsageError
from ..names import check_name

KEYS = {"study", "trials", "sampler", "seed", "pruner", "base", "grid", "space", "metric", "nproc"}
TYPES = {"categorical", "int", "float", "log-float"}
PRUNERS = {"median", "percentile", "none"}
PRUNER_KEYS = {"type", "startup_trials", "warmup_epochs", "percentile"}
# The sweep places every trial's run itself (SWEEP_FOLDER/trialNNNN, replaced if a crash left it
# half-made): a spec that set these could send trial outputs, or that replacing, anywhere.
RUN_DIR_SETTINGS = {"out_dir", "name", "overwrite", "resume"}
# Every trial is queued in the database when the study is created; beyond this that is a typo.
MAX_TRIALS = 100_000
MAX_SEED = 2**32 - 1  # numpy's RandomState, under Optuna's samplers, takes 0 .. 2**32 - 1


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
    nproc: int = 1  # processes per trial (nnperf train --nproc): each trial runs under torchrun's launcher

    @property
    def fingerprint(self) -> str:
        """Identifies the search (not the trial count), so a study name cannot silently be reused
        for a different sweep."""
        search = {k: self.raw.get(k) for k in ("base", "grid", "space", "sampler", "pruner", "metric")}
        return hashlib.sha256(json.dumps(search, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fail(path: Path, where: str, message: str) -> UsageError:
    return UsageError(f"{path}: {where}: {message}")


def _names(keys) -> str:
    # YAML keys may be numbers or dates as well as strings: sort what is shown, as text.
    return ", ".join(sorted(str(k) for k in keys))


def _is_number(value) -> bool:
    """A finite int or float (YAML's .inf and .nan are floats; true and false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(path: Path, where: str, value, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(path, where, f"must be a whole number from {low} to {high}, got {value!r}")
    return value


def _check_nproc(path: Path, nproc: int, base: dict, points: list[dict], space: dict) -> None:
    """What `nnperf train --nproc` would refuse in a trial (too few devices here, a batch that does not
    divide), said now, before the study exists."""
    from ..train import launch

    sizes = space.get("batch_size")
    if sizes is not None:
        ends = sizes.choices if sizes.type == "categorical" else [sizes.low, sizes.step or 1]
        if any(int(v) % nproc for v in ends):
            raise _fail(path, "space.batch_size", f"with nproc {nproc} every batch size must divide among the "
                                                  f"processes: its low and step (or choices) must be multiples of "
                                                  f"{nproc}")
    for values in [{**base, **p} for p in points] or [base]:
        try:
            launch.check(nproc, configs.build({}, values))
        except UsageError as e:
            raise _fail(path, "nproc", str(e).replace("--nproc", "nproc").replace("--batch-size", "batch_size"))


def _check_settings(path: Path, where: str, values: dict) -> None:
    known = configs.known_names()  # a spec written before a setting was renamed still loads
    unknown = set(values) - known
    if unknown:
        raise _fail(path, where, f"unknown setting(s) {_names(unknown)} (see nnperf train --help)")
    placed = set(values) & RUN_DIR_SETTINGS
    if placed:
        raise _fail(path, where, f"{_names(placed)} cannot be set in a sweep: each trial is a run "
                                 "directory SWEEP_FOLDER/trialNNNN (choose the folder with --out-dir)")
    try:
        configs.build({}, values)
    except UsageError as e:
        raise _fail(path, where, str(e)) from None


def _setting_kinds() -> dict[str, type]:
    return {f.name: f.metadata["kind"] for f in configs.fields()}


def _param(path: Path, name, body) -> Param:
    where = f"space.{name}"
    kind = body.get("type") if isinstance(body, dict) else None
    if not isinstance(kind, str) or kind not in TYPES:
        raise _fail(path, where, f"needs type: one of {', '.join(sorted(TYPES))}")
    takes = {"categorical": {"choices"}, "log-float": {"low", "high"}}.get(kind, {"low", "high", "step"})
    extra = set(body) - takes - {"type"}
    if extra:
        raise _fail(path, where, f"unknown key(s) {_names(extra)} ({kind} takes {_names(takes)})")
    setting = _setting_kinds().get(name)
    if kind == "categorical":
        return Param(name, kind, _choices(path, where, body.get("choices")))
    if setting is not None and setting not in (int, float):
        raise _fail(path, where, f"{name} is not a number; search it with type: categorical")
    if setting is int and kind != "int":
        raise _fail(path, where, f"{name} is a whole number; search it with type: int")
    return _numeric(path, where, Param(name, kind, [], body.get("low"), body.get("high"), body.get("step")))


def _choices(path: Path, where: str, choices) -> list:
    # Optuna stores categorical choices as JSON scalars; a list or mapping cannot be one.
    if not isinstance(choices, list) or not choices:
        raise _fail(path, where, "categorical needs a non-empty choices list")
    for c in choices:
        if not (c is None or isinstance(c, (str, bool)) or _is_number(c)):
            raise _fail(path, where, f"choice {c!r} is not a string, a finite number, true, false or null")
    return choices


def _numeric(path: Path, where: str, p: Param) -> Param:
    if not (_is_number(p.low) and _is_number(p.high)):
        raise _fail(path, where, f"{p.type} needs finite numbers low and high, got {p.low!r} and {p.high!r}")
    if p.low >= p.high:
        raise _fail(path, where, f"impossible range: low {p.low} is not below high {p.high}")
    if p.type == "log-float" and p.low <= 0:
        raise _fail(path, where, f"log-float needs low > 0, got {p.low}")
    if p.type == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
        raise _fail(path, where, "int needs whole-number low and high")
    if p.step is not None and not (_is_number(p.step) and 0 < p.step <= p.high - p.low
                                   and (p.type != "int" or float(p.step).is_integer())):
        raise _fail(path, where, f"step {p.step!r} does not fit the range (a number above 0, at most "
                                 f"high - low{', whole for int' if p.type == 'int' else ''})")
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
        # Counted before crossing: a few long lists would otherwise fill the memory.
        if len(points) + math.prod(len(v) for v in values) > MAX_TRIALS:
            raise _fail(path, "grid", f"more than {MAX_TRIALS} points")
        points += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return points


def _pruner(path: Path, pruner) -> dict:
    if pruner is None:
        return {"type": "median"}
    if not isinstance(pruner, dict):
        raise _fail(path, "pruner", "must be a mapping, e.g. {type: median, startup_trials: 5, warmup_epochs: 1}")
    kind = pruner.get("type", "median")
    if not isinstance(kind, str) or kind not in PRUNERS:
        raise _fail(path, "pruner.type", f"must be one of {', '.join(sorted(PRUNERS))}, got {kind!r}")
    extra = set(pruner) - PRUNER_KEYS
    if extra:
        raise _fail(path, "pruner", f"unknown key(s) {_names(extra)} (expected {_names(PRUNER_KEYS)})")
    _whole(path, "pruner.startup_trials", pruner.get("startup_trials", 5), 0, MAX_TRIALS)
    _whole(path, "pruner.warmup_epochs", pruner.get("warmup_epochs", 1), 0, 100_000)
    percentile = pruner.get("percentile", 25.0)
    if not _is_number(percentile) or not 0 <= percentile <= 100:
        raise _fail(path, "pruner.percentile", f"must be a number from 0 to 100, got {percentile!r}")
    return pruner


def _mapping(path: Path, raw: dict, key: str, what: str) -> dict:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be a mapping of {what}")
    return value


def _study_name(path: Path, raw: dict, given: str | None) -> str:
    """The study name becomes the sweep folder's name (sweeps/STUDY): one plain folder name."""
    if given is not None:
        check_name(given, "--study")
    if raw.get("study") is not None:
        check_name(raw["study"], f"{path}: study")
    if given is not None:
        return given
    if raw.get("study") is not None:
        return raw["study"]
    return check_name(path.stem, f"{path}: study (not set, so the file name's; set study: or --study)")


def load(path: str | Path, study: str | None = None) -> Spec:
    path = Path(path)
    raw = configs.read_yaml_mapping(path, f"SPEC {path}")
    unknown = set(raw) - KEYS
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {_names(unknown)} (expected {_names(KEYS)})")
    name = _study_name(path, raw, study)
    if raw.get("metric", "top1") != "top1":
        raise _fail(path, "metric", "only top1 (validation top-1, maximised) is supported")
    base = _mapping(path, raw, "base", "nnperf train settings")
    _check_settings(path, "base", base)
    points = grid_points(path, raw.get("grid"))
    for i, point in enumerate(points):
        _check_settings(path, f"grid point {i} {point}", {**base, **point})
    space_raw = _mapping(path, raw, "space", "setting: {type: ..., ...}")
    space = {key: _param(path, key, body) for key, body in space_raw.items()}
    for key, p in space.items():
        ends = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in ends:
            _check_settings(path, f"space.{key}", {**base, key: int(value) if p.type == "int" else value})
    clash = {k for pt in points for k in pt} & set(space)
    if clash:
        raise _fail(path, "space", f"{_names(clash)} also in grid; a setting is either gridded or searched")
    least = max(1, len(points))
    trials = raw.get("trials", len(points) or 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or not least <= trials <= MAX_TRIALS:
        grid = f" (the grid has {len(points)} points)" if points else ""
        raise _fail(path, "trials", f"must be a whole number from {least} to {MAX_TRIALS}{grid}, got {trials!r}")
    if trials > len(points) and not space:
        raise _fail(path, "trials", f"{trials} trials but only {len(points)} grid points and no space to search")
    sampler = raw.get("sampler", "tpe")
    if not isinstance(sampler, str) or sampler not in ("tpe", "random"):
        raise _fail(path, "sampler", f"unknown sampler {sampler!r} (tpe or random)")
    seed = _whole(path, "seed", raw.get("seed", 0), 0, MAX_SEED)
    pruner = _pruner(path, raw.get("pruner"))
    nproc = _whole(path, "nproc", raw.get("nproc", 1), 1, 1024)
    if nproc > 1:
        _check_nproc(path, nproc, base, points, space)
    return Spec(path, name, trials, sampler, seed, pruner, base, points, space, raw, nproc)
