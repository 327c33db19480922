"""--time-budget: time the first steps on this device, then choose the number of epochs (and with it
the learning-rate schedule) so that the whole run, evaluation included, ends within the budget.

The probe trains a few real steps and evaluates a few real batches, then puts the model, optimizer,
gradient scaler and random generators back as they were: the run that follows is the one
`--epochs N` would have trained, and the probe's time counts against the budget like any other.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import device as devices
from ..errors import UsageError
from . import checkpoint
from .build import Run
from .optim import make_schedule
from .step import tta_logits

WARMUP_STEPS = 1  # untimed: the first step pays for allocation, autotuning and compilation
PROBE_S = 2.0  # time steps (and evaluation batches) until this long has passed...
PROBE_MAX = 8  # ...or this many have run
MARGIN = 0.03  # of the budget, kept back for checkpoints, the last lines and timing noise
MAX_EPOCHS = 100_000


@dataclass
class Probe:
    step_s: float  # one training step
    steps: int  # how many were timed
    eval_batch_s: float  # one evaluation batch (0 without an evaluation split)


def fit_to_budget(run: Run, started: float, log: Callable[[str], None]) -> None:
    """Set run.cfg.epochs and run.scheduler for --time-budget; `started` is time.monotonic() when the
    command began (setting up counts against the budget too)."""
    probe = measure(run)
    cfg = run.cfg
    epoch_s = probe.step_s * len(run.train)
    eval_s = probe.eval_batch_s * len(run.eval) if run.eval is not None else 0.0
    spent = time.monotonic() - started
    epochs = epochs_within(cfg.time_budget, spent, epoch_s, eval_s, cfg.eval_every)
    if epochs < 1:
        need = spent + epoch_s + eval_s
        raise UsageError(f"--time-budget {format_s(cfg.time_budget)}: too short for one epoch here: an epoch takes "
                         f"about {format_s(epoch_s)} to train and {format_s(eval_s)} to evaluate on {run.dev}, after "
                         f"{format_s(spent)} of setting up; give at least {format_s(need / (1 - MARGIN))}, or lower "
                         "--batch-size or use a smaller model")
    cfg.epochs = epochs
    run.scheduler = make_schedule(cfg, run.optimizer, len(run.train) * epochs)
    run.budget_clock = (started, time.monotonic())
    planned = spent + epochs * epoch_s + evaluations(epochs, cfg.eval_every) * eval_s
    log(f"--time-budget {format_s(cfg.time_budget)}: a training step takes {probe.step_s * 1000:.1f} ms here "
        f"({probe.steps} timed after {WARMUP_STEPS} warm-up), an epoch {format_s(epoch_s)} + {format_s(eval_s)} "
        f"evaluation; setting up took {format_s(spent)}; chose {epochs} epoch{'s' if epochs != 1 else ''} "
        f"(about {format_s(planned)} in all)")


def keep_within(run: Run, log: Callable[[str], None]) -> None:
    """After each epoch of a run whose epochs --time-budget chose: when the epochs so far (evaluation
    and checkpoints included) say that the rest will not fit, fewer epochs, the schedule shortened to
    match (a probe of a few steps can miss what a whole epoch costs on a busy machine)."""
    if run.budget_clock is None or run.pos.epoch >= run.cfg.epochs or run.pos.step:
        return
    started, training = run.budget_clock
    now, done = time.monotonic(), run.pos.epoch
    per_epoch = (now - training) / done
    left = run.cfg.time_budget * (1 - MARGIN) - (now - started)
    fits = done + max(1, int(left // per_epoch))
    if fits >= run.cfg.epochs:
        return
    log(f"--time-budget {format_s(run.cfg.time_budget)}: an epoch takes {format_s(per_epoch)} here, more than "
        f"probed; {fits} epochs instead of {run.cfg.epochs}, the schedule shortened to match")
    run.cfg.epochs = fits
    for schedule in run.scheduler.lr_lambdas:
        schedule.total = len(run.train) * fits


def epochs_within(budget_s: float, spent_s: float, epoch_s: float, eval_s: float, eval_every: int) -> int:
    """The most epochs whose training and evaluations fit in what is left of the budget (0 if none)."""
    left = budget_s * (1 - MARGIN) - spent_s
    if left <= 0 or epoch_s <= 0:
        return 0 if left <= 0 else MAX_EPOCHS
    n = min(MAX_EPOCHS, int(left // epoch_s))
    while n > 0 and n * epoch_s + evaluations(n, eval_every) * eval_s > left:
        n -= 1
    return n


def evaluations(epochs: int, eval_every: int) -> int:
    """Evaluations in a run of `epochs`: every `eval_every` epochs and after the last."""
    return epochs // eval_every + (1 if epochs % eval_every else 0)


def measure(run: Run) -> Probe:
    """Time training steps and evaluation batches on the run's own data, leaving no trace on it."""
    saved = _snapshot(run)
    try:
        step_s, steps = _time_steps(run)
        eval_s = _time_eval(run) if run.eval is not None and len(run.eval) else 0.0
    finally:
        _restore(run, saved)
    return Probe(step_s, steps, eval_s)


def _time_steps(run: Run) -> tuple[float, int]:
    run.model.train()
    batches = _cycle(run.train)
    for _ in range(WARMUP_STEPS):
        run.step(*next(batches))
    return _timed(run.dev, lambda: run.step(*next(batches)))


def _time_eval(run: Run) -> float:
    run.model.eval()
    batches = _cycle(run.eval)

    def one() -> None:
        x, _ = next(batches)
        with torch.no_grad(), devices.autocast(run.dev, run.hw.precision):
            tta_logits(run.model, x, run.cfg.tta)

    one()  # warm-up, as for training
    return _timed(run.dev, one)[0]


def _timed(dev: torch.device, call: Callable[[], object]) -> tuple[float, int]:
    """(seconds per call, calls timed): calls until PROBE_S has passed or PROBE_MAX have run."""
    devices.sync(dev)
    start = time.perf_counter()
    n = 0
    while n < PROBE_MAX and (n == 0 or time.perf_counter() - start < PROBE_S):
        call()
        n += 1
        devices.sync(dev)
    return (time.perf_counter() - start) / n, n


def _cycle(batches):
    """The batches of epoch 0 over and over (a split of one small batch still gives enough)."""
    while True:
        yield from batches.epoch(0)


def _snapshot(run: Run) -> dict:
    return {"model": copy.deepcopy(run.model.state_dict()), "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "scaler": run.scaler.state_dict() if run.scaler else None, "rng": checkpoint.rng_state(run.dev),
            "grad": [p.grad for p in run.model.parameters()]}


def _restore(run: Run, saved: dict) -> None:
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scaler is not None:
        run.scaler.load_state_dict(saved["scaler"])
    checkpoint.restore_rng(saved["rng"], run.dev)
    for p, grad in zip(run.model.parameters(), saved["grad"]):
        p.grad = grad
    run.model.train()


def format_s(seconds: float) -> str:
    """600 -> '10m', 75 -> '1m15s', 9.5 -> '9.5s', 5400 -> '1h30m'."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
