"""Checkpoints: written atomically, read with weights_only=True, checked before use."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import config as configs
from ..data.augment import Augment
from ..data.loader import RESIZE_MODES
from ..errors import UsageError
from ..fileio import CHECKPOINT_FORMAT, read_torch, write_stream
from . import rundir
from .step import EpochSums

if TYPE_CHECKING:  # the run is built in build.py, which imports this module
    from .build import Run

FORMAT = CHECKPOINT_FORMAT


def save(path: str | Path, state: dict) -> None:
    write_stream(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def read(path: str | Path, flag: str) -> object:
    """Whatever a torch file holds, read safely (weights_only), or a one-line error about the file."""
    return read_torch(path, flag)


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
    size = data.get("input_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and 4 <= size <= 4096):
        return "data input size is not a side of 4 to 4096 pixels"
    if data.get("interpolation", "bilinear") not in RESIZE_MODES:
        return f"data interpolation is not one of {', '.join(RESIZE_MODES)}"
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
    saved = {k: v for k, v in configs.upgraded(state["config"]).items() if k in known}
    try:
        configs.build(saved, {"resume": None})
    except UsageError as e:
        raise UsageError(f"{flag} {path}: its saved config is not valid ({e})") from None
    return saved


def config_and_state(given: dict, preset_path: str | None) -> tuple[configs.TrainConfig, dict | None]:
    """The config `nnperf train` runs with these flags (given) on top of a --config preset, and the
    loaded checkpoint when the flags or the preset say --resume (else None)."""
    preset = configs.load_yaml(preset_path) if preset_path else {}
    resume = given.get("resume") or preset.get("resume")
    if resume:
        state = load(resume)
        return resume_config(state, preset, given, resume), state
    return configs.build(preset, given), None


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
    for key in ("pretrained", "init_from"):  # starting weights: a resumed run has its own already
        if given.get(key) is not None and given[key] != saved.get(key):
            raise UsageError(f"{configs.flag_name(key)}: a resumed run continues from its checkpoint's weights; "
                             f"drop {configs.flag_name(key)} (or start a new run from them)")
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


# ---- a run's state: what a checkpoint holds, and putting it back ----------------------------------

def state_of(run: Run, sums: EpochSums) -> dict:
    """Everything needed to continue `run` exactly, with the current epoch's running sums."""
    p = run.pos
    return {"config": configs.to_dict(run.cfg), "data": run.info.to_dict(), "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler else None,
            "hardware": {"precision": run.hw.precision.name, "channels_last": run.hw.channels_last},
            "epoch": p.epoch, "step": p.step,
            "global_step": p.global_step, "best": p.best, "sums": sums.state(), "rng": rng_state(run.dev),
            "lookahead": run.lookahead.average if run.lookahead else None}


def restore(run: Run, state: dict) -> None:
    """Put the checkpoint's state into the built run; a part that does not fit is one line."""
    if state["step"] > len(run.train):
        raise UsageError(f"--resume {run.cfg.resume}: its position (step {state['step']} of an epoch) does not fit "
                         f"this run's {len(run.train)} steps per epoch; resume with the run's own --batch-size")
    for part, put_back in (("model", _restore_model), ("optimizer", _restore_optimizer),
                           ("schedule", _restore_schedule), ("random-number state", _restore_rng),
                           ("position", _restore_position)):
        try:
            put_back(run, state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise UsageError(f"--resume {run.cfg.resume}: its {part} cannot be restored ({reason}); "
                             "use another checkpoint of the run") from None


def _restore_model(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    if run.lookahead is not None and state.get("lookahead"):
        run.lookahead.average = {k: v.to(run.dev) for k, v in state["lookahead"].items()}


def _restore_optimizer(run: Run, state: dict) -> None:
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])


def _restore_schedule(run: Run, state: dict) -> None:
    run.scheduler.load_state_dict(state["scheduler"])
    for schedule in run.scheduler.lr_lambdas:
        # Loading restored the old run length; a resume with more --epochs stretches the schedule.
        schedule.total = len(run.train) * run.cfg.epochs


def _restore_rng(run: Run, state: dict) -> None:
    restore_rng(state["rng"], run.dev)


def _restore_position(run: Run, state: dict) -> None:
    p = run.pos
    p.epoch, p.step, p.global_step, p.best = state["epoch"], state["step"], state["global_step"], state["best"]
    # The saved sums are every rank's together: with several processes rank 0 carries them, the others
    # start from zero, and the epoch's all-reduce adds them up again.
    run.sums = EpochSums.restored(state["sums"], run.dev) if run.world.main else EpochSums.zero(run.dev)


def rng_state(dev: torch.device) -> dict:
    """The CPU generator's state and that of the training device's own generator (no other device's)."""
    rng = {"torch": torch.get_rng_state()}
    if dev.type == "cuda":
        rng["device"] = {"type": "cuda", "state": torch.cuda.get_rng_state(dev)}
    elif dev.type == "xpu":
        rng["device"] = {"type": "xpu", "state": torch.xpu.get_rng_state(dev)}
    elif dev.type == "mps":
        rng["device"] = {"type": "mps", "state": torch.mps.get_rng_state()}
    return rng


def restore_rng(rng: dict, dev: torch.device) -> None:
    """Undo rng_state(); also reads older checkpoints, whose "cuda" entry lists every GPU's state."""
    torch.set_rng_state(rng["torch"])
    saved = rng.get("device")
    if isinstance(saved, dict) and saved.get("type") == dev.type:
        state = saved["state"]
    elif dev.type == "cuda" and isinstance(rng.get("cuda"), (list, tuple)) and (dev.index or 0) < len(rng["cuda"]):
        state = rng["cuda"][dev.index or 0]
    else:
        return  # saved on another kind of device (or none): only the CPU state carries over
    if dev.type == "cuda":
        torch.cuda.set_rng_state(state, dev)
    elif dev.type == "xpu":
        torch.xpu.set_rng_state(state, dev)
    elif dev.type == "mps":
        torch.mps.set_rng_state(state)
