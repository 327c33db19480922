"""Checkpoints: written atomically, read with weights_only=True, checked before use."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import config as configs
from ..errors import UsageError
from ..fileio import write_stream

FORMAT = "nnperf-checkpoint/1"


def save(path: str | Path, state: dict) -> None:
    write_stream(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load(path: str | Path, flag: str = "--resume") -> dict:
    """A full nnperf checkpoint, or a one-line error saying what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a bad file; all mean the same
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt? {reason[:160]})") from None
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
    data = state["data"]
    if len(data["shape"]) != 3 or not all(isinstance(v, int) and v > 0 for v in data["shape"]):
        return "data shape is not three positive sizes"
    if not data["classes"] or len(data["mean"]) != data["shape"][0] or len(data["std"]) != data["shape"][0]:
        return "data classes or normalisation do not fit its shape"
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        return "no random-number state"
    if state["epoch"] < 0 or state["step"] < 0 or state["global_step"] < 0:
        return "negative position"
    return None


def resume_config(state: dict, preset: dict, overrides: dict, path: str) -> configs.TrainConfig:
    """The checkpoint's config with the user's explicit settings on top; the model and dataset must
    stay those the checkpoint was trained with. A checkpoint in RUN/checkpoints/ continues RUN
    unless --out-dir or --name say otherwise; --max-steps limits one invocation, so it is not
    carried over."""
    saved = state["config"]
    given = {**preset, **overrides}
    for key in ("model", "dataset"):
        if key in given and given[key] != saved[key]:
            raise UsageError(f"--resume {path}: checkpoint is of {key} '{saved[key]}', not '{given[key]}' "
                             f"(drop --{key} or start a new run)")
    known = {f.name for f in configs.fields()}
    base = {k: v for k, v in saved.items() if k in known}
    base["max_steps"] = 0
    own = Path(path).parent.parent if Path(path).resolve().parent.name == "checkpoints" else None
    if own is not None:
        base["out_dir"], base["name"] = str(own.parent), own.name
    return configs.build(base, {**given, "resume": str(path)})


def state_matches_model(state: dict, model: torch.nn.Module, path: str) -> None:
    """Refuse weights whose names or shapes do not fit `model` (a checkpoint of another model)."""
    own = model.state_dict()
    theirs = state["model"]
    if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
        raise UsageError(f"--resume {path}: the weights do not fit this model "
                         f"(a checkpoint of another model, width or class count)")
