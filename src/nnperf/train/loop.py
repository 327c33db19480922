"""fit(): build, then per epoch train -> evaluate -> write metrics and checkpoints; resumable at any step."""

from __future__ import annotations

import json
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
from .. import telemetry
from ..telemetry import backends as telemetry_backends
from ..errors import Interrupted, UsageError
from ..fileio import read_jsonl, write_json, write_jsonl, write_text, write_with
from . import checkpoint, rundir
from .build import Hardware, build_model, choose_hardware, eval_batches, load_splits, train_batches
from .optim import Lookahead, make_optimizer, make_schedule
from .signals import StopRequest
from .step import CompiledOrEager, TrainStep, evaluate, topk_correct
from .tracking import Tracking, open_tracking

# Images the data-dependent initialisation (the fast model's whitening layer) looks at.
INIT_IMAGES = 5000


@dataclass
class Position:
    """Where training is: completed epochs, completed steps of the current epoch, and the running
    sums of the current epoch (kept as tensors so a resumed epoch adds up bit for bit the same)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: dict | None = None
    sums: dict = field(default_factory=dict)

    def reset_sums(self, dev: torch.device) -> None:
        self.sums = {"loss": torch.zeros((), dtype=torch.float64, device=dev),
                     "top1": torch.zeros((), dtype=torch.int64, device=dev),
                     "top5": torch.zeros((), dtype=torch.int64, device=dev),
                     "images": 0, "seconds": 0.0, "data_wait_s": 0.0}


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
    hw = choose_hardware(cfg)
    if cfg.optimizer == "sam" and hw.precision.needs_scaler:
        raise UsageError("--optimizer sam: needs --precision fp32 or bf16 on this device, not fp16")
    splits = load_splits(cfg)
    info = state["data"] if state else splits.info
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info, hw.dev, hw.channels_last)
    if state:
        checkpoint.state_matches_model(state, model, cfg.resume)
    else:
        _init_from_data(model, splits.train, info, hw.dev)
    train = train_batches(cfg, splits.train, info, hw.dev, hw.channels_last)
    evals = eval_batches(cfg, splits.get(info["eval_split"]), info, hw.dev, hw.channels_last)
    optimizer = make_optimizer(cfg, model)
    # --max-steps only stops early; the schedule keeps its full length so a stopped run can resume.
    scheduler = make_schedule(cfg, optimizer, len(train) * cfg.epochs)
    scaler = torch.amp.GradScaler(hw.dev.type) if hw.precision.needs_scaler else None
    forward = CompiledOrEager(model, log) if cfg.compile else None
    step = TrainStep(model, optimizer, scaler, hw.dev, hw.precision, cfg.label_smoothing, forward)
    lookahead = Lookahead(model, cfg.lookahead_every, cfg.lookahead_decay) if cfg.lookahead_every else None
    path = rundir.for_resume(cfg) if state else rundir.create(cfg)
    return Run(cfg, path, hw, info, model, optimizer, scheduler, scaler, train, evals, step, lookahead)


def _restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    for schedule in run.scheduler.lr_lambdas:
        # Loading restored the old run length; a resume with more --epochs stretches the schedule.
        schedule.total = len(run.train) * run.cfg.epochs
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.lookahead is not None and state.get("lookahead"):
        run.lookahead.average = {k: v.to(run.dev) for k, v in state["lookahead"].items()}
    torch.set_rng_state(state["rng"]["torch"])
    if run.dev.type == "cuda" and state["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    p = run.pos
    p.epoch, p.step, p.global_step, p.best = state["epoch"], state["step"], state["global_step"], state["best"]
    p.reset_sums(run.dev)
    for key, value in state["sums"].items():
        p.sums[key] = value.to(run.dev) if isinstance(value, torch.Tensor) else value
    metrics = run.dir / "metrics.jsonl"
    # Rows written after this checkpoint belong to steps that will now run again.
    old = read_jsonl(metrics) if metrics.is_file() else []
    run.rows = [r for r in old if r.get("step", 0) <= p.global_step]


def _state(run: Run) -> dict:
    p = run.pos
    rng = {"torch": torch.get_rng_state()}
    if run.dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
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
            "data_wait_s": s["data_wait_s"]}


def _train_epoch(run: Run, stop: StopRequest, bar) -> None:
    """Train from the current position to the end of the epoch (or --max-steps, or a signal)."""
    cfg, p, s = run.cfg, run.pos, run.pos.sums
    run.model.train()
    if hasattr(run.model, "on_epoch_start"):  # models with an epoch-dependent part (fast: whitening bias)
        run.model.on_epoch_start(p.epoch)
    devices.sync(run.dev)
    started = time.perf_counter()
    waited = 0.0
    if run.tracking is not None:
        run.tracking.start_epoch(p.global_step)
    ask = time.perf_counter()
    for x, y in run.train.epoch(p.epoch, p.step):
        waited += time.perf_counter() - ask
        _where(run, "train")
        loss, logits = run.step(x, y)
        if run.tracking is not None:
            run.tracking.losses.append(loss)
        run.scheduler.step()
        if run.lookahead is not None and (p.global_step + 1) % run.lookahead.every == 0:
            run.lookahead.update(run.model, (p.global_step + 1) / (len(run.train) * cfg.epochs))
        s["loss"] += loss.double() * len(y)
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
        ask = time.perf_counter()
    devices.sync(run.dev)
    s["seconds"] += time.perf_counter() - started
    s["data_wait_s"] += waited
    if stop.signum is not None:
        _save_interrupted(run, stop.signum)


def _save_interrupted(run: Run, signum: int) -> None:
    path = run.ckpt_dir / "last.pt"
    write_jsonl(run.dir / "metrics.jsonl", run.rows)  # step rows of the unfinished epoch
    checkpoint.save(path, _state(run))
    raise Interrupted(signum, str(path))


def _is_last_epoch(run: Run) -> bool:
    return run.pos.epoch + 1 >= run.cfg.epochs or _steps_done(run)


def _end_epoch(run: Run, log: Callable[[str], None]) -> None:
    """Evaluate (every --eval-every epochs and at the end), write the epoch's metrics and
    checkpoints, and print its line."""
    cfg, p = run.cfg, run.pos
    last = _is_last_epoch(run)
    if last and run.lookahead is not None:
        run.lookahead.finish(run.model)
    train_row = {**_train_row(run, "train"), **_energy(run, "train")}
    run.rows.append(train_row)
    val, val_losses = None, []
    if last or (p.epoch + 1) % cfg.eval_every == 0:
        _where(run, "val")
        val = evaluate(run.model, run.eval, run.dev, run.hw.precision, cfg.tta,
                       val_losses if run.tracking is not None else None)
        val = {**val, **_energy(run, "val")}
        run.rows.append({"t": time.time(), "epoch": p.epoch + 1, "step": p.global_step, "phase": "val", **val})
    write_jsonl(run.dir / "metrics.jsonl", run.rows)
    if run.tracking is not None:
        run.tracking.end_epoch(p.epoch + 1, p.global_step, cfg.batch_size, train_row, val, val_losses)
    p.epoch, p.step = p.epoch + 1, 0
    improved = val is not None and (p.best is None or val["top1"] > p.best["top1"])
    if improved:
        p.best = {"epoch": p.epoch, "top1": val["top1"], "top5": val["top5"], "loss": val["loss"]}
    p.reset_sums(run.dev)
    state = _state(run)
    checkpoint.save(run.ckpt_dir / "last.pt", state)
    if improved:
        checkpoint.save(run.ckpt_dir / "best.pt", state)
    if cfg.save_every and p.epoch % cfg.save_every == 0:
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


def final_line(best: dict) -> str:
    return f"FINAL top1 {best['top1']:.3f}, top5 {best['top5']:.3f}, loss {best['loss']:.3f} (epoch {best['epoch']})"


def _start_files(run: Run, resumed: bool) -> None:
    if run.cfg.clear_perf:
        rundir.clear_telemetry(run.dir)
    write_text(run.dir / "config.yaml", configs.to_yaml(run.cfg))
    env = envinfo.collect(run.dev, run.hw.precision, run.hw.channels_last)
    env["channels_last_reason"] = run.hw.layout_reason
    env["data"] = run.info
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
    run.pos.reset_sums(run.dev)
    if state:
        _restore(run, state)
    _start_files(run, resumed=state is not None)
    log(f"run {run.dir} | {cfg.dataset} {cfg.model} on {run.dev} ({devices.device_name(run.dev)}) | "
        f"{run.hw.describe()}")
    run.sampler = _start_telemetry(run, log)
    try:
        run.tracking = open_tracking(cfg, run.dir, run.optimizer, log)
        if run.tracking is not None:
            run.step.grad_norms = run.tracking.grad_norms
        with StopRequest() as stop:
            while run.pos.epoch < cfg.epochs and not _steps_done(run):
                bar = _progress_bar(run)
                try:
                    _train_epoch(run, stop, bar)
                finally:
                    if bar is not None:
                        bar.close()
                _end_epoch(run, log)
    finally:
        if run.sampler is not None:
            run.sampler.stop()
        if run.tracking is not None:
            run.tracking.close()  # after the sampler: its last rows reach the sinks too
        _update_env(run, {"telemetry": _telemetry_info(run)})
    write_with(run.ckpt_dir / "final_weights.pt", lambda tmp: torch.save(run.model.state_dict(), tmp))
    log(final_line(run.pos.best))
    return {"run_dir": str(run.dir), "best": run.pos.best, "epochs": run.pos.epoch, "steps": run.pos.global_step}


def _steps_done(run: Run) -> bool:
    return bool(run.cfg.max_steps) and run.pos.global_step >= run.cfg.max_steps
