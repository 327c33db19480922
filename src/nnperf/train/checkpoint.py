"""Checkpoints: written atomically, read with weights_only=True, checked before use."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .. import config as configs
from ..data.augment import Augment
from ..errors import UsageError
from ..fileio import write_stream
from . import rundir

FORMAT = "nnperf-checkpoint/1"


def save(path: str | Path, state: dict) -> None:
    write_stream(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def read(path: str | Path, flag: str) -> object:
    """Whatever a torch file holds, read safely (weights_only), or a one-line error about the file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: {'not a regular file' if p.exists() else 'no such file'}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a bad file; all mean the same
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if reason.startswith("Weights only load failed"):
            reason = "it holds objects that a safe load refuses"
        raise UsageError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt? {reason[:160]})") from None


def load(path: str | Path, flag: str = "--resume") -> dict:
    """A full nnperf checkpoint, or a one-line error saying what is wrong with the file."""
    state = read(path, flag)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{flag} {path}: not an nnperf checkpoint (use checkpoints/last.pt or best.pt of a run)")
    problem = _missing(state)
    if problem:
        raise UsageError(f"{flag} {path}: incomplete nnperf checkpoint ({problem}); use another checkpoint of the run")
    return state


# What each part of a checkpoint must be for train --resume, test and predict to use it.
_PARTS = {"config": dict, "data": dict, "model": dict, "optimizer": dict, "scheduler": dict, "epoch": int,
          "step": int, "global_step": int, "best": (dict, type(None)), "sums": dict, "rng": dict}
_DATA = {"classes": list, "shape": list, "mean": list, "std": list, "augment": dict, "eval_split": str}


def _missing(state: dict) -> str | None:
    """What is missing or of the wrong type in a checkpoint, or None."""
    for parts, where in ((_PARTS, state), (_DATA, state.get("data"))):
        if not isinstance(where, dict):
            return "no data description"
        for key, kind in parts.items():
            if key not in where:
                return f"no '{key}'"
            if not isinstance(where[key], kind) or isinstance(where[key], bool):
                return f"'{key}' is not a {kind.__name__ if isinstance(kind, type) else kind[0].__name__}"
    return _bad_data(state["data"]) or _bad_position(state)


def data_problem(data: object) -> str | None:
    """What is wrong with a data description (from a checkpoint or a run's env.json), or None."""
    if not isinstance(data, dict):
        return "no data description"
    for key, kind in _DATA.items():
        if not isinstance(data.get(key), kind):
            return f"data '{key}' is missing or not a {kind.__name__}"
    return _bad_data(data)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad_data(data: dict) -> str | None:
    shape, classes = data["shape"], data["classes"]
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape) \
            or not (1 <= shape[0] <= 4 and 1 <= shape[1] <= 4096 and 1 <= shape[2] <= 4096):
        return "data shape is not (1 to 4 channels, height and width up to 4096)"
    if not 1 <= len(classes) <= 100_000 or not all(isinstance(c, str) for c in classes):
        return "data classes are not a list of names"
    if not all(len(v) == shape[0] and all(_number(x) for x in v) for v in (data["mean"], data["std"])) \
            or not all(x > 0 for x in data["std"]):
        return "data normalisation does not fit its shape"
    if set(data["augment"]) - {f.name for f in dataclasses.fields(Augment)}:
        return "data augmentation has unknown settings"
    if data["eval_split"] not in ("train", "val", "test"):
        return "data evaluation split is not train, val or test"
    return None


def _bad_position(state: dict) -> str | None:
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        return "no random-number state"
    if not all(0 <= state[k] < 2**62 for k in ("epoch", "step", "global_step")):
        return "its position is out of range"
    best = state["best"]
    if best is not None and not all(_number(best.get(k)) for k in ("epoch", "top1", "top5", "loss")):
        return "its best epoch's figures are not numbers"
    sums = state["sums"]
    if not all(isinstance(sums.get(k), torch.Tensor) and sums[k].numel() == 1 for k in ("loss", "top1", "top5")) \
            or not all(_number(sums.get(k, 0)) for k in ("images", "seconds", "data_wait_s", "skipped_steps")):
        return "its running sums are not numbers"
    return None


def config_of(state: dict, path: str, flag: str) -> dict:
    """The saved config's known settings, checked: a checkpoint from a newer nnperf may have more."""
    known = {f.name for f in configs.fields()}
    saved = {k: v for k, v in state["config"].items() if k in known}
    try:
        configs.build(saved, {"resume": None})
    except UsageError as e:
        raise UsageError(f"{flag} {path}: its saved config is not valid ({e})") from None
    return saved


def resume_config(state: dict, preset: dict, overrides: dict, path: str) -> configs.TrainConfig:
    """The checkpoint's config with the user's explicit settings on top; the model and dataset must
    stay those the checkpoint was trained with. A checkpoint in RUN/checkpoints/ continues RUN
    unless --out-dir or --name say otherwise; --max-steps limits one invocation, so it is not
    carried over."""
    saved = config_of(state, path, "--resume")
    given = {**preset, **overrides}
    for key in ("model", "dataset"):
        if key in given and given[key] != saved.get(key):
            raise UsageError(f"--resume {path}: checkpoint is of {key} '{saved.get(key)}', not '{given[key]}' "
                             f"(drop --{key} or start a new run)")
    base = {**saved, "max_steps": 0}
    own = rundir.checkpoint_run(path)
    continues_own = own is not None and "name" not in given and "out_dir" not in given
    if continues_own and rundir.config_name(own) != saved.get("name"):
        # A checkpoint of another run dropped into RUN/checkpoints/ must not take RUN over.
        raise UsageError(f"--resume {path}: this checkpoint is of run '{saved.get('name')}', not of {own} (run "
                         f"'{rundir.config_name(own)}'); copy it outside {own}/checkpoints to start a new run from it")
    if own is not None:
        base["out_dir"], base["name"] = str(own.parent), own.name
    return configs.build(base, {**given, "resume": str(path)})


def state_matches_model(state: dict, model: torch.nn.Module, path: str, flag: str = "--resume") -> None:
    """Refuse weights whose names or shapes do not fit `model` (a checkpoint of another model)."""
    own = model.state_dict()
    theirs = state["model"]
    if set(own) != set(theirs) or any(not isinstance(theirs[k], torch.Tensor) or own[k].shape != theirs[k].shape
                                      for k in own):
        raise UsageError(f"{flag} {path}: the weights do not fit this model "
                         f"(a checkpoint of another model, width or class count)")
