"""fit(): build, then per epoch train -> evaluate -> write metrics and checkpoints; resumable at any step."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .. import config as configs
from .. import device as devices
from .. import envinfo
from .. import telemetry, track
from ..telemetry import backends as telemetry_backends
from ..errors import Diverged, EnvError, Interrupted, UsageError
from ..fileio import describe_os_error, read_jsonl, write_json, write_jsonl, write_stream, write_text
from . import checkpoint, rundir
from .build import Hardware, build_model, choose_hardware, eval_batches, load_splits, train_batches
from .optim import Lookahead, make_optimizer, make_schedule
from .signals import StopRequest
from .inputwait import InputWait, measured_by
from .step import CompiledOrEager, TrainStep, evaluate, topk_correct
from .tracking import Tracking, open_tracking

# Images the data-dependent initialisation (the fast model's whitening layer) looks at.
INIT_IMAGES = 5000
# With --nan-policy skip, this many non-finite steps in a row mean the run has diverged anyway.
MAX_SKIPPED_IN_A_ROW = 100


@dataclass
class Position:
    """Where training is: completed epochs, completed steps of the current epoch, and the running
    sums of the current epoch (kept as tensors so a resumed epoch adds up bit for bit the same)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: dict | None = None
    sums: dict = field(default_factory=dict)
    last_finite: tuple | None = None  # (global step, loss as a float or a tensor) of the last finite training loss
    skipped_in_a_row: int = 0

    def reset_sums(self, dev: torch.device) -> None:
        self.sums = {"loss": torch.zeros((), dtype=devices.accumulator_dtype(dev), device=dev),
                     "top1": torch.zeros((), dtype=torch.int64, device=dev),
                     "top5": torch.zeros((), dtype=torch.int64, device=dev),
                     "images": 0, "seconds": 0.0, "data_wait_s": 0.0, "skipped_steps": 0}


@dataclass
class Run:
    cfg: configs.TrainConfig
    dir: Path
    hw: Hardware
    info: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    train: object
    eval: object
    step: TrainStep
    lookahead: Lookahead | None
    sampler: telemetry.Sampler | None = None
    tracking: Tracking | None = None
    on_epoch: Callable[[dict, dict | None], None] | None = None  # (train row, val row) after each epoch
    rows: list = field(default_factory=list)
    pos: Position = field(default_factory=Position)
    fresh: bool = True  # the run directory was made by this invocation
    partial_val: dict | None = None  # the evaluation where --max-steps cut an epoch short
    stop: StopRequest | None = None

    @property
    def dev(self) -> torch.device:
        return self.hw.dev

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"


def _init_from_data(model: torch.nn.Module, split, info: dict, dev: torch.device) -> None:
    """Data-dependent initialisation for models that have one (the fast model's whitening)."""
    if hasattr(model, "init_from_data"):
        images = split.images[:INIT_IMAGES].to(dev).float().div_(255)
        mean = torch.tensor(info["mean"], device=dev).view(1, -1, 1, 1)
        std = torch.tensor(info["std"], device=dev).view(1, -1, 1, 1)
        model.init_from_data((images - mean) / std)


def _setup(cfg: configs.TrainConfig, state: dict | None, log: Callable[[str], None]) -> Run:
    """Build everything and check it can run; the run directory is made (or reopened) last, so a
    bad setting or file leaves nothing behind."""
    path, fresh = rundir.for_resume(cfg) if state else (rundir.check_new(cfg), True)
    track.check_installed(cfg)
    hw = choose_hardware(cfg)
    if cfg.optimizer == "sam" and hw.precision.needs_scaler:
        raise UsageError("--optimizer sam: needs --precision fp32 or bf16 on this device, not fp16")
    if state and cfg.max_steps and state["global_step"] >= cfg.max_steps:
        raise UsageError(f"--max-steps {cfg.max_steps}: the checkpoint is already at step {state['global_step']}; "
                         "raise --max-steps or drop it to train to the end of --epochs")
    splits = load_splits(cfg)
    if state:
        _check_same_data(state["data"], splits.info, cfg.resume)
    info = state["data"] if state else splits.info
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info, hw.dev, hw.channels_last)
    if state:
        checkpoint.state_matches_model(state, model, cfg.resume)
    else:
        _init_from_data(model, splits.train, info, hw.dev)
    _check_model_runs(cfg, model, info, hw)
    train = train_batches(cfg, splits.train, info, hw.dev, hw.channels_last)
    evals = eval_batches(cfg, splits.get(info["eval_split"]), info, hw.dev, hw.channels_last)
    optimizer = make_optimizer(cfg, model)
    # --max-steps only stops early; the schedule keeps its full length so a stopped run can resume.
    scheduler = make_schedule(cfg, optimizer, len(train) * cfg.epochs)
    scaler = torch.amp.GradScaler(hw.dev.type) if hw.precision.needs_scaler else None
    forward = CompiledOrEager(model, log) if cfg.compile else None
    step = TrainStep(model, optimizer, scaler, hw.dev, hw.precision, cfg.label_smoothing, forward,
                     skip_nonfinite=cfg.nan_policy == "skip")
    lookahead = Lookahead(model, cfg.lookahead_every, cfg.lookahead_decay) if cfg.lookahead_every else None
    run = Run(cfg, path, hw, info, model, optimizer, scheduler, scaler, train, evals, step, lookahead, fresh=fresh)
    run.pos.reset_sums(run.dev)
    if state:
        _restore(run, state)
    if fresh:
        rundir.create(cfg)
    else:
        rundir.prepare_resume(path)
    return run


def _check_same_data(saved: dict, now: dict, path: str) -> None:
    """A resumed run must see the data it was trained on, or its labels and schedule no longer fit."""
    for key in ("classes", "shape", "train_images", "eval_split"):
        if key in saved and saved[key] != now.get(key):
            def shown(v):
                return f"{len(v)} classes" if key == "classes" and isinstance(v, list) else v
            raise UsageError(f"--resume {path}: the data differ from the checkpoint's ({key}: {shown(saved[key])} "
                             f"then, {shown(now.get(key))} now); resume with the run's own data settings")


def _check_model_runs(cfg: configs.TrainConfig, model: torch.nn.Module, info: dict, hw: Hardware) -> None:
    """One forward pass on two blank images, so that a model that cannot take this input size
    fails here, with the flags to change, before a run directory exists."""
    channels, height, width = info["shape"]
    x = torch.zeros(2, channels, height, width, device=hw.dev)
    if hw.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {cfg.model}: cannot run on {channels}x{height}x{width} images ({reason}); "
                         "use a larger --image-size or another --model") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, len(info["classes"])):
        raise UsageError(f"--model {cfg.model}: gives outputs of shape {tuple(out.shape)} for "
                         f"{len(info['classes'])} classes; use another --model")


def _restore(run: Run, state: dict) -> None:
    """Put the checkpoint's state into the built run; a part that does not fit is one line."""
    if state["step"] > len(run.train):
        raise UsageError(f"--resume {run.cfg.resume}: its position (step {state['step']} of an epoch) does not fit "
                         f"this run's {len(run.train)} steps per epoch; resume with the run's own --batch-size")
    for part, restore in (("model", _restore_model), ("optimizer", _restore_optimizer),
                          ("schedule", _restore_schedule), ("random-number state", _restore_rng),
                          ("position", _restore_position)):
        try:
            restore(run, state)
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


def _restore_position(run: Run, state: dict) -> None:
    p = run.pos
    p.epoch, p.step, p.global_step, p.best = state["epoch"], state["step"], state["global_step"], state["best"]
    for key, value in state["sums"].items():
        if key in p.sums:
            p.sums[key] = value.to(run.dev, p.sums[key].dtype) if isinstance(value, torch.Tensor) else value
    own = rundir.checkpoint_run(run.cfg.resume)
    metrics = (own if own is not None else run.dir) / "metrics.jsonl"
    old = read_jsonl(metrics) if metrics.is_file() else []
    # Rows written after this checkpoint belong to steps that will now run again, and so does the
    # epoch row of an epoch that --max-steps cut short.
    run.rows = [r for r in old if isinstance(r, dict) and isinstance(r.get("step", 0), int)
                and r.get("step", 0) <= p.global_step
                and not (p.step and r.get("epoch") == p.epoch + 1 and r.get("phase") in ("train", "val"))]


def _state(run: Run) -> dict:
    p = run.pos
    rng = rng_state(run.dev)
    return {"config": configs.to_dict(run.cfg), "data": run.info, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler else None, "epoch": p.epoch, "step": p.step,
            "global_step": p.global_step, "best": p.best, "sums": dict(p.sums), "rng": rng,
            "lookahead": run.lookahead.average if run.lookahead else None}


def _lr(run: Run) -> float:
    return run.optimizer.param_groups[0]["lr"]


def _train_row(run: Run, phase: str) -> dict:
    s, p = run.pos.sums, run.pos
    n = max(1, s["images"])
    return {"t": time.time(), "epoch": p.epoch + 1, "step": p.global_step, "phase": phase,
            "loss": s["loss"].item() / n, "top1": s["top1"].item() / n, "top5": s["top5"].item() / n,
            "lr": _lr(run), "images": s["images"], "seconds": s["seconds"],
            "images_per_s": s["images"] / s["seconds"] if s["seconds"] > 0 else None,
            "data_wait_s": s["data_wait_s"],
            **({"skipped_steps": s["skipped_steps"]} if run.cfg.nan_policy == "skip" else {})}


def _train_epoch(run: Run, bar) -> None:
    """Train from the current position to the end of the epoch (or --max-steps, or a signal)."""
    cfg, p, s, stop = run.cfg, run.pos, run.pos.sums, run.stop
    if stop.signum is not None:  # a signal while the previous epoch was evaluated or saved
        _save_interrupted(run, stop.signum)
    run.model.train()
    if hasattr(run.model, "on_epoch_start"):  # models with an epoch-dependent part (fast: whitening bias)
        run.model.on_epoch_start(p.epoch)
    if run.tracking is not None:
        run.tracking.start_epoch(p.global_step)
    pending = None  # the previous step's loss, checked one step late so the host never waits on the device
    wait = InputWait(run.dev)
    devices.sync(run.dev)
    started = time.perf_counter()
    for x, y in wait.batches(run.train, p.epoch, p.step):
        _where(run, "train")
        loss, logits = run.step(x, y)
        if pending is not None:
            _check_finite(run, *pending)
        pending = (loss, p.global_step + 1)
        run.scheduler.step()
        if run.lookahead is not None and (p.global_step + 1) % run.lookahead.every == 0:
            run.lookahead.update(run.model, (p.global_step + 1) / (len(run.train) * cfg.epochs))
        if run.step.skipped:
            _count_skipped(run)
        else:
            p.skipped_in_a_row = 0
            if run.step.skip_nonfinite:
                p.last_finite = (p.global_step + 1, loss)  # a tensor: read only if the run diverges
            if run.tracking is not None:
                run.tracking.losses.append(loss)
            s["loss"] += loss.to(s["loss"].dtype) * len(y)
            s["top1"] += topk_correct(logits, y, 1)
            s["top5"] += topk_correct(logits, y, 5)
            s["images"] += len(y)
        p.step += 1
        p.global_step += 1
        if bar is not None:
            bar.update(1)
        if cfg.log_every and p.global_step % cfg.log_every == 0:
            run.rows.append({**_train_row(run, "train_step"), "seconds": None, "images_per_s": None})
        if stop.signum is not None or (cfg.max_steps and p.global_step >= cfg.max_steps):
            break
    if pending is not None:
        _check_finite(run, *pending)
    devices.sync(run.dev)
    s["seconds"] += time.perf_counter() - started
    s["data_wait_s"] += wait.total()
    if stop.signum is not None:
        _save_interrupted(run, stop.signum)


def _count_skipped(run: Run) -> None:
    p = run.pos
    p.sums["skipped_steps"] += 1
    p.skipped_in_a_row += 1
    if p.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise Diverged(_diverged(run, p.global_step + 1, f"{p.skipped_in_a_row} steps in a row had a non-finite "
                                 "loss or gradients (--nan-policy skip)"))


def _check_finite(run: Run, loss: torch.Tensor, step: int) -> None:
    """--nan-policy stop: a non-finite loss ends the run here, before anything non-finite is saved."""
    if run.step.skip_nonfinite:
        return
    value = loss.item()
    if math.isfinite(value):
        run.pos.last_finite = (step, value)
        return
    raise Diverged(_diverged(run, step, f"the training loss is {value}"))


def _diverged(run: Run, step: int, what: str) -> str:
    cfg, last = run.cfg, run.pos.last_finite
    before = f"last finite loss {float(last[1]):.4g} at step {last[0]}" if last else "no finite loss before it"
    likely = [f"--lr {cfg.lr:g}"]
    if cfg.weight_decay:
        likely.append(f"--weight-decay {cfg.weight_decay:g}")
    if run.hw.precision.name == "fp16":
        likely.append("--precision fp16 (try bf16 or fp32)")
    kept = run.ckpt_dir / "last.pt"
    saved = f"the last good checkpoint is {kept}" if kept.is_file() else "no checkpoint was saved"
    skip = "" if cfg.nan_policy == "skip" else "; or pass --nan-policy skip to skip such steps"
    return (f"diverged at step {step} (epoch {run.pos.epoch + 1}): {what}; {before}. Likely too high: "
            f"{', '.join(likely)}{skip}. Nothing non-finite was saved; {saved}")


def _save_interrupted(run: Run, signum: int) -> None:
    path = run.ckpt_dir / "last.pt"
    with run.stop.saving():
        write_jsonl(run.dir / "metrics.jsonl", run.rows)  # step rows of the unfinished epoch
        checkpoint.save(path, _state(run))
    raise Interrupted(signum, str(path))


def _weights_finite(run: Run) -> bool:
    flags = [torch.isfinite(t).all() for t in run.model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _end_epoch(run: Run, log: Callable[[str], None]) -> None:
    """Evaluate (every --eval-every epochs, at the end, and where --max-steps stops), write the
    epoch's metrics and checkpoints, and print its line. An epoch that --max-steps cut short keeps
    its position, so that a resume finishes it."""
    cfg, p = run.cfg, run.pos
    whole = p.step >= len(run.train)
    last = whole and p.epoch + 1 >= cfg.epochs
    if last and run.lookahead is not None:
        run.lookahead.finish(run.model)
    train_row = {**_train_row(run, "train"), **_energy(run, "train")}
    run.rows.append(train_row)
    val, val_losses = None, []
    if last or not whole or (p.epoch + 1) % cfg.eval_every == 0:
        _where(run, "val")
        val = evaluate(run.model, run.eval, run.dev, run.hw.precision, cfg.tta,
                       val_losses if run.tracking is not None else None)
        val = {**val, **_energy(run, "val")}
        run.rows.append({"t": time.time(), "epoch": p.epoch + 1, "step": p.global_step, "phase": "val", **val})
    if not _weights_finite(run):
        raise Diverged(_diverged(run, p.global_step, "the weights are no longer finite"))
    if val is not None and not math.isfinite(val["loss"]):
        raise Diverged(_diverged(run, p.global_step, f"the validation loss is {val['loss']}"))
    write_jsonl(run.dir / "metrics.jsonl", run.rows)
    if run.tracking is not None:
        run.tracking.end_epoch(p.epoch + 1, p.global_step, cfg.batch_size, train_row, val, val_losses)
    # An epoch that --max-steps cut short is evaluated for the smoke run's FINAL line, but only whole
    # epochs compete for best.pt: the resume finishes that epoch and evaluates it again.
    improved = whole and val is not None and (p.best is None or val["top1"] > p.best["top1"])
    if not whole and val is not None:
        run.partial_val = {"epoch": p.epoch + 1, "step": p.global_step, **val}
    if improved:
        p.best = {"epoch": p.epoch + 1, "top1": val["top1"], "top5": val["top5"], "loss": val["loss"]}
    if whole:
        p.epoch, p.step = p.epoch + 1, 0
        p.reset_sums(run.dev)
    state = _state(run)
    with run.stop.saving():
        checkpoint.save(run.ckpt_dir / "last.pt", state)
        if improved:
            checkpoint.save(run.ckpt_dir / "best.pt", state)
        if whole and cfg.save_every and p.epoch % cfg.save_every == 0:
            checkpoint.save(run.ckpt_dir / f"epoch{p.epoch:04d}.pt", state)
    log(epoch_line(train_row, val))
    if run.on_epoch is not None:
        run.on_epoch(train_row, val)  # may raise to stop the run (a pruned sweep trial)


def _where(run: Run, phase: str) -> None:
    if run.sampler is not None:
        run.sampler.set_phase(phase, run.pos.epoch + 1, run.pos.global_step)


def _energy(run: Run, phase: str) -> dict:
    """energy_j of this epoch's phase, where some device could tell it (never made up)."""
    window = run.sampler.energy.window(phase, run.pos.epoch + 1) if run.sampler is not None else None
    return window or {}


def _start_telemetry(run: Run, log: Callable[[str], None]) -> telemetry.Sampler | None:
    if not run.cfg.telemetry:
        return None
    backends = telemetry_backends.for_device(run.dev, warn=log)
    sampler = telemetry.Sampler(backends, run.dir / "telemetry", run.cfg.telemetry_interval, run=run.cfg.name)
    sampler.set_phase("train", run.pos.epoch + 1, run.pos.global_step)
    return sampler.start()


def _telemetry_info(run: Run) -> dict:
    if run.sampler is None:
        return {"enabled": False}
    return {"enabled": True, "interval_s": run.cfg.telemetry_interval,
            "backends": [{"name": w.backend.name, "device": w.backend.device, "disabled": w.disabled}
                         for w in run.sampler.workers],
            "energy_method": {d: {"counter": "energy counter differences",
                                  "power": "sampled power integrated over time (trapezoid)"}[m]
                              for d, m in run.sampler.energy.methods.items()},
            "sampler_cpu_s": run.sampler.cpu_s, "samples": run.sampler.samples}


def epoch_line(train: dict, val: dict | None) -> str:
    ips = f"{train['images_per_s']:.0f}" if train["images_per_s"] else "-"
    evaluated = f"val {val['loss']:.3f} top1 {val['top1']:.3f} top5 {val['top5']:.3f}" if val else "val -"
    return (f"e{train['epoch']}: train {train['loss']:.3f}/{train['top1']:.3f} | {evaluated} | "
            f"{train['seconds']:.1f}s {ips} img/s")


def partial_line(val: dict) -> str:
    return (f"FINAL top1 {val['top1']:.3f}, top5 {val['top5']:.3f}, loss {val['loss']:.3f} (step {val['step']}, "
            f"epoch {val['epoch']} cut short by --max-steps; not a best.pt: --resume finishes it)")


def final_line(best: dict | None) -> str:
    if best is None:
        return "FINAL: no evaluation yet (the run stopped before its first evaluation)"
    return f"FINAL top1 {best['top1']:.3f}, top5 {best['top5']:.3f}, loss {best['loss']:.3f} (epoch {best['epoch']})"


def _start_files(run: Run, resumed: bool) -> None:
    if run.cfg.clear_perf:
        rundir.clear_telemetry(run.dir)
    # config.yaml reruns the run: without the resume, which belongs to this invocation only.
    write_text(run.dir / "config.yaml", configs.to_yaml(dataclasses.replace(run.cfg, resume=None)))
    env = envinfo.collect(run.dev, run.hw.precision, run.hw.channels_last)
    env["channels_last_reason"] = run.hw.layout_reason
    env["data"] = run.info
    env["data_wait_s"] = measured_by(run.dev)
    if resumed:
        env["resumed_at"] = {"epoch": run.pos.epoch, "step": run.pos.step, "global_step": run.pos.global_step}
    write_json(run.dir / "env.json", env)


def _update_env(run: Run, extra: dict) -> None:
    path = run.dir / "env.json"
    env = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**env, **extra})


def _progress_bar(run: Run):
    if not sys.stderr.isatty():
        return None
    return tqdm(total=len(run.train), initial=run.pos.step, desc=f"e{run.pos.epoch + 1}", leave=False,
                unit="batch", dynamic_ncols=True)


def fit(cfg: configs.TrainConfig, state: dict | None = None, log: Callable[[str], None] = print,
        on_epoch: Callable[[dict, dict | None], None] | None = None) -> dict:
    """Train as `cfg` says (continuing from `state`, a loaded checkpoint, if given), calling
    `on_epoch(train_row, val_row)` after each epoch. Returns the run directory and the best epoch's
    metrics."""
    if cfg.name is None:
        cfg.name = rundir.default_name(cfg)
    run = _setup(cfg, state, log)
    run.on_epoch = on_epoch
    try:
        with StopRequest() as run.stop:
            _start(run, state, log)
            _train(run, log)
            with run.stop.saving():
                write_stream(run.ckpt_dir / "final_weights.pt", lambda f: torch.save(run.model.state_dict(), f))
    except OSError as e:
        _forget_if_unsaved(run)
        raise EnvError(_environment_failed(run, e)) from None
    except Interrupted:
        raise  # its position is saved
    except BaseException:  # a bug, a divergence, an abort before the first checkpoint
        _forget_if_unsaved(run)
        raise
    log(final_line(run.pos.best) if run.pos.best or run.partial_val is None else partial_line(run.partial_val))
    return {"run_dir": str(run.dir), "best": run.pos.best, "epochs": run.pos.epoch, "steps": run.pos.global_step}


def _start(run: Run, state: dict | None, log: Callable[[str], None]) -> None:
    _start_files(run, resumed=state is not None)
    log(f"run {run.dir} | {run.cfg.dataset} {run.cfg.model} on {run.dev} ({devices.device_name(run.dev)}) | "
        f"{run.hw.describe()}")


def _train(run: Run, log: Callable[[str], None]) -> None:
    """The epochs, with telemetry and the metric sinks around them."""
    run.sampler = _start_telemetry(run, log)
    try:
        run.tracking = open_tracking(run.cfg, run.dir, run.optimizer, log)
        if run.tracking is not None:
            run.step.grad_norms = run.tracking.grad_norms
        while run.pos.epoch < run.cfg.epochs and not _steps_done(run):
            bar = _progress_bar(run)
            try:
                _train_epoch(run, bar)
            finally:
                if bar is not None:
                    bar.close()
            _end_epoch(run, log)
    finally:
        _close_telemetry(run, log)


def _close_telemetry(run: Run, log: Callable[[str], None]) -> None:
    """Stop the sampler and the sinks; their failures are warnings, never a second error on top of
    the one that may be on its way out."""
    for what, close in (("telemetry", run.sampler.stop if run.sampler else None),
                        ("metric sinks", run.tracking.close if run.tracking else None)):
        if close is not None:
            try:
                close()  # the sampler first: its last rows reach the sinks too
            except Exception as e:  # noqa: BLE001
                log(f"warning: closing {what} failed ({type(e).__name__}: {e})")
    try:
        _update_env(run, {"telemetry": _telemetry_info(run)})
    except OSError as e:
        log(f"warning: env.json not updated ({describe_os_error(e)})")


def _environment_failed(run: Run, e: OSError) -> str:
    last = run.ckpt_dir / "last.pt"
    if last.is_file():
        return (f"{describe_os_error(e)}. The last good checkpoint {last} is intact: resume with "
                f"nnperf train --resume {last}")
    return describe_os_error(e)


def _forget_if_unsaved(run: Run) -> None:
    """A run directory this invocation made, that failed before saving any checkpoint, holds
    nothing worth keeping: remove it rather than leave a half-made run behind."""
    if run.fresh and not any(run.ckpt_dir.glob("*.pt")):
        shutil.rmtree(run.dir, ignore_errors=True)


def _steps_done(run: Run) -> bool:
    return bool(run.cfg.max_steps) and run.pos.global_step >= run.cfg.max_steps
