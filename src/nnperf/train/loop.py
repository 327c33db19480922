"""fit(): build the run, then for each epoch: train, evaluate, log, save. Resumable at any step.

Reading order: `fit` -> `_epochs` -> `_train_epoch` (each batch through `TrainStep`, step.py) ->
`_end_epoch` (evaluate, one row to every sink: metrics.jsonl, console, trackers; checkpoints).
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Callable

import torch
from tqdm import tqdm

from .. import config as configs
from .. import device as devices
from .. import envinfo, telemetry, track
from ..errors import EnvError, Interrupted
from ..fileio import describe_os_error, write_stream
from ..lines import final_line, partial_line
from ..perf import flops
from ..telemetry import backends as telemetry_backends
from . import budget, build, checkpoint, dist, divergence, rundir
from .build import Run
from .inputwait import InputWait, measured_by
from .signals import StopRequest
from .step import EpochSums, StepResult, evaluate, grad_norm_summary

def fit(cfg: configs.TrainConfig, state: dict | None = None, log: Callable[[str], None] = print,
        sinks: list | tuple = ()) -> dict:
    """Train as `cfg` says (continuing from `state`, a loaded checkpoint, if given), logging every
    row to metrics.jsonl, the console (`log`), the trackers cfg asks for and `sinks` (track.Sink;
    one may end the run after an epoch by raising track.StopRun). Returns the run directory and the
    best epoch's metrics."""
    started = time.monotonic()
    world = dist.from_env()
    if not world.main:  # rank 0 speaks for the run; the others only warn
        log = _warnings_only(log)
    if cfg.name is None:
        cfg.name = rundir.default_name(cfg)
    try:
        result = _fit(cfg, state, log, sinks, started)
    except Exception as e:
        if world.many and dist.lost_contact(e):
            if not world.main and not dist.is_training():
                # Rank 0 left during setup: it said why (a setting, the run directory); one line is enough.
                raise SystemExit(1) from None
            raise EnvError(dist.lost_contact_line(world, cfg.dist_timeout, e)) from None
        raise
    dist.finish()  # after a failure the others may be gone: the process's exit closes the group then
    return result


def _fit(cfg: configs.TrainConfig, state: dict | None, log: Callable[[str], None], sinks: list | tuple,
         started: float) -> dict:
    run = build.setup(cfg, state, log)
    try:
        with StopRequest() as run.stop:
            _fit_to_budget(run, state, started, log)
            _start(run, state, log)
            _epochs(run, log, list(sinks))
            with run.stop.saving():
                if run.world.main:
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
    return {"run_dir": str(run.dir), "best": run.pos.best, "epochs": run.pos.epoch, "steps": run.pos.global_step,
            "main": run.world.main}


def _fit_to_budget(run: Run, state: dict | None, started: float, log: Callable[[str], None]) -> None:
    if run.cfg.time_budget is None:
        return
    if state is not None:  # the budget chose the epochs when the run began; they stay
        log(f"--time-budget: a resumed run keeps its {run.cfg.epochs} epochs (give --epochs to change them)")
        return
    budget.fit_to_budget(run, started, log)


def start_env(run: Run) -> dict:
    """env.json of a run as it starts: versions and device, how it computes and why, its data."""
    env = envinfo.collect(run.dev, run.hw.precision, run.hw.channels_last)
    env.update(channels_last_reason=run.hw.layout_reason, data=run.info.to_dict(), data_wait_s=measured_by(run.dev))
    if run.world.many:
        env["distributed"] = run.world.describe()
    if run.hw.policy is not None:
        env["policy"] = run.hw.policy
    return env


def _start(run: Run, state: dict | None, log: Callable[[str], None]) -> None:
    env = start_env(run)
    if state is not None:
        env["resumed_at"] = {"epoch": run.pos.epoch, "step": run.pos.step, "global_step": run.pos.global_step}
    if run.world.main:
        rundir.write_start_files(run.dir, run.cfg, env)
    log(f"run {run.dir} | {run.cfg.dataset} {run.cfg.model} on {run.dev} ({devices.device_name(run.dev)}) | "
        f"{run.hw.describe()}")


def _epochs(run: Run, log: Callable[[str], None], extra_sinks: list) -> None:
    """The epochs, with telemetry and the sinks around them."""
    run.sampler = _start_telemetry(run, log)
    try:
        run.sinks = _open_sinks(run, log, extra_sinks)
        run.step.grad_norm = run.sinks.wants_batches
        start = run.sums or EpochSums.zero(run.dev)
        while run.pos.epoch < run.cfg.epochs and not _steps_done(run):
            measured = _train_epoch(run, start)
            _end_epoch(run, measured)
            budget.keep_within(run, log)
            start = EpochSums.zero(run.dev)
    finally:
        _close(run, log)


def _train_epoch(run: Run, sums: EpochSums) -> EpochSums:
    """Train from the current position to the end of the epoch (or --max-steps, or a signal);
    returns `sums` (the epoch's so far) with this pass added."""
    p, stop = run.pos, run.stop
    vote = dist.StopVote(run.world, run.dev)
    stop.signum = vote.now(stop.signum)
    if stop.signum is not None:  # a signal while the previous epoch was evaluated or saved
        _save_interrupted(run, sums)
    _start_epoch(run, sums)
    pending = None  # the previous step's loss, checked one step late so the host never waits on the device
    wait, bar = InputWait(run.dev), _progress_bar(run)
    devices.sync(run.dev)
    started = time.perf_counter()
    try:
        for x, y in wait.batches(run.train, p.epoch, p.step):
            _set_sampler_phase(run, "train")
            run.step.loss_weight = dist.loss_weight(run.world, len(y), run.train.global_rows(p.step))
            result = run.step(x, y)
            if pending is not None:
                divergence.check_finite(run, *pending)
            pending = (result.loss, p.global_step + 1)
            _after_step(run, result, y, sums, bar)
            stop.signum = vote.after_step(stop.signum)  # several processes: every rank's, one step late
            if stop.signum is not None or _steps_done(run):
                break
            if run.cfg.save_every_steps and p.global_step % run.cfg.save_every_steps == 0 and p.step < len(run.train):
                _save_position(run, sums, started)
    finally:
        if bar is not None:
            bar.close()
    if pending is not None:
        divergence.check_finite(run, *pending)
    devices.sync(run.dev)
    sums.seconds += time.perf_counter() - started
    sums.data_wait_s += wait.total()
    if stop.signum is not None:
        _save_interrupted(run, sums)
    return sums


def _start_epoch(run: Run, sums: EpochSums) -> None:
    run.model.train()
    if run.freezer is not None and run.freezer.apply(run.pos.epoch):
        build.refresh_forward(run)
    if hasattr(run.model, "on_epoch_start"):  # models with an epoch-dependent part (fast: whitening bias)
        run.model.on_epoch_start(run.pos.epoch)
    sums.first_step = run.pos.global_step  # where this pass's batch losses start


def _after_step(run: Run, result: StepResult, labels: torch.Tensor, sums: EpochSums, bar) -> None:
    """Schedule, weight averaging and the running sums after one step; a --log-every row."""
    cfg, p = run.cfg, run.pos
    run.scheduler.step()
    if run.lookahead is not None and (p.global_step + 1) % run.lookahead.every == 0:
        run.lookahead.update(run.model, (p.global_step + 1) / (len(run.train) * cfg.epochs))
    if result.skipped:
        divergence.count_skipped(run, sums)
    else:
        p.skipped_in_a_row = 0
        if run.step.skip_nonfinite:
            p.last_finite = (p.global_step + 1, result.loss)  # a tensor: read only if the run diverges
        sums.add(result, labels, keep_batches=run.sinks.wants_batches)
    p.step += 1
    p.global_step += 1
    if bar is not None:
        bar.update(1)
    if cfg.log_every and p.global_step % cfg.log_every == 0:
        run.sinks.log({"kind": "step", **_train_row(run, sums, "train_step"), "seconds": None, "images_per_s": None})


def _end_epoch(run: Run, sums: EpochSums) -> None:
    """Evaluate (every --eval-every epochs, at the end, and where --max-steps stops), log the epoch's
    row to every sink, and save its checkpoints. An epoch that --max-steps cut short keeps its
    position, so that a resume finishes it."""
    p = run.pos
    whole = p.step >= len(run.train)
    last = whole and p.epoch + 1 >= run.cfg.epochs
    if last and run.lookahead is not None:
        run.lookahead.finish(run.model)
    ranks = dist.per_rank(sums, p.global_step - sums.first_step, run.world, run.dev)
    sums = dist.summed(sums, run.world, run.dev)
    train = {**_train_row(run, sums, "train"), **_energy(run, "train"), **({"ranks": ranks} if ranks else {})}
    val, val_losses = _evaluate(run, whole, last)
    divergence.check_not_diverged(run, val)
    stop = None
    try:
        run.sinks.log(_epoch_row(run, sums, train, val, val_losses))
    except track.StopRun as e:  # a sink ends the run (a pruned sweep trial): after the epoch is saved
        stop = e
    improved = _advance(run, val, whole)
    _save_epoch(run, sums if not whole else EpochSums.zero(run.dev), improved, whole)
    if stop is not None:
        raise stop


def _evaluate(run: Run, whole: bool, last: bool) -> tuple[dict | None, list]:
    if whole and not last and (run.pos.epoch + 1) % run.cfg.eval_every:
        return None, []
    _set_sampler_phase(run, "val")
    losses: list = []
    val = evaluate(run.model, run.eval, run.dev, run.hw.precision, run.cfg.tta,
                   losses if run.sinks.wants_batches else None, run.world)
    return {"t": time.time(), "epoch": run.pos.epoch + 1, "step": run.pos.global_step, "phase": "val",
            **val, **_energy(run, "val")}, losses


def _epoch_row(run: Run, sums: EpochSums, train: dict, val: dict | None, val_losses: list) -> dict:
    row = {"kind": "epoch", "epoch": run.pos.epoch + 1, "step": run.pos.global_step,
           "batch_size": run.cfg.batch_size, "train": train, "val": val}
    if run.sinks.wants_batches:
        norm, skipped = grad_norm_summary(sums.grad_norms)
        losses = {"train": sums.batch_losses, "val": val_losses}
        row.update(first_step=sums.first_step, grad_norm=norm, scaler_skipped_steps=skipped,
                   batch_losses={k: torch.stack(v).float().tolist() if v else [] for k, v in losses.items()})
    return row


def _advance(run: Run, val: dict | None, whole: bool) -> bool:
    """Record the evaluation and move to the next epoch; whether it is the best so far. An epoch
    that --max-steps cut short is evaluated for the FINAL line, but only whole epochs compete for
    best.pt: the resume finishes that epoch and evaluates it again."""
    p = run.pos
    improved = whole and val is not None and (p.best is None or val["top1"] > p.best["top1"])
    if not whole and val is not None:
        run.partial_val = {"epoch": p.epoch + 1, "step": p.global_step, **val}
    if improved:
        p.best = {"epoch": p.epoch + 1, "top1": val["top1"], "top5": val["top5"], "loss": val["loss"]}
    if whole:
        p.epoch, p.step = p.epoch + 1, 0
    return improved


def _save_epoch(run: Run, sums: EpochSums, improved: bool, whole: bool) -> None:
    if not run.world.main:
        return
    state = checkpoint.state_of(run, sums)
    with run.stop.saving():
        checkpoint.save(run.ckpt_dir / "last.pt", state)
        if improved:
            checkpoint.save(run.ckpt_dir / "best.pt", state)
        if whole and run.cfg.save_every and run.pos.epoch % run.cfg.save_every == 0:
            checkpoint.save(run.ckpt_dir / f"epoch{run.pos.epoch:04d}.pt", state)


def _train_row(run: Run, sums: EpochSums, phase: str) -> dict:
    p = run.pos
    return {"t": time.time(), "epoch": p.epoch + 1, "step": p.global_step, "phase": phase, **sums.means(),
            "lr": run.optimizer.param_groups[0]["lr"], "images": sums.images, "seconds": sums.seconds,
            "images_per_s": sums.images / sums.seconds if sums.seconds > 0 else None,
            "data_wait_s": sums.data_wait_s, **_mfu(run, sums),
            **({"skipped_steps": sums.skipped_steps} if run.cfg.nan_policy == "skip" else {})}


def _mfu(run: Run, sums: EpochSums) -> dict:
    """Model FLOPs utilisation of the epoch: FLOPs per image x images/s / the device's measured peak."""
    frozen = run.freezer is not None and run.freezer.frozen(run.pos.epoch)
    per_image = run.flops_per_image_frozen if frozen else run.flops_per_image
    if per_image is None:
        return {}
    ips = sums.images / sums.seconds if sums.seconds > 0 else None
    value = flops.mfu(per_image, ips, run.peak_flops)
    return {"model_flops_per_image": per_image, **({"mfu": value} if value is not None else {})}


def _warnings_only(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: log(line) if line.startswith("warning") else None


# ---- stopping -------------------------------------------------------------------------------------

def _save_position(run: Run, sums: EpochSums, started: float) -> None:
    """--save-every-steps: last.pt at this step, mid-epoch (the epoch's sums so far, over every rank)."""
    at = copy.copy(sums)
    at.seconds += time.perf_counter() - started
    at = dist.summed(at, run.world, run.dev)
    if run.world.main:
        with run.stop.saving():
            run.metrics.write()  # the step rows so far
            checkpoint.save(run.ckpt_dir / "last.pt", checkpoint.state_of(run, at))


def _save_interrupted(run: Run, sums: EpochSums) -> None:
    """Save where every rank stopped (all ranks stop after the same step, see dist.StopVote), once."""
    path = run.ckpt_dir / "last.pt"
    sums = dist.summed(sums, run.world, run.dev)
    with run.stop.saving():
        if run.world.main:
            run.metrics.write()  # the step rows of the unfinished epoch
            checkpoint.save(path, checkpoint.state_of(run, sums))
    raise Interrupted(run.stop.signum, str(path))


def _steps_done(run: Run) -> bool:
    return bool(run.cfg.max_steps) and run.pos.global_step >= run.cfg.max_steps


def _environment_failed(run: Run, e: OSError) -> str:
    last = run.ckpt_dir / "last.pt"
    if last.is_file():
        return (f"{describe_os_error(e)}. The last good checkpoint {last} is intact: resume with "
                f"nnperf train --resume {last}")
    return describe_os_error(e)


def _forget_if_unsaved(run: Run) -> None:
    if run.fresh and run.world.main:
        rundir.remove_if_unsaved(run.dir)


# ---- telemetry and sinks --------------------------------------------------------------------------

def _start_telemetry(run: Run, log: Callable[[str], None]) -> telemetry.Sampler | None:
    """Every rank samples its own devices; several processes write telemetry/rank{R}/, rows tagged."""
    if not run.cfg.telemetry:
        return None
    w = run.world
    folder, tags = run.dir / "telemetry", {}
    if w.many:
        folder, tags = folder / f"rank{w.rank}", {"rank": w.rank, "local_rank": w.local_rank, "host": w.host}
    backends = telemetry_backends.for_device(run.dev, warn=log)
    sampler = telemetry.Sampler(backends, folder, run.cfg.telemetry_interval, run=run.cfg.name, tags=tags)
    sampler.set_phase("train", run.pos.epoch + 1, run.pos.global_step)
    return sampler.start()


def _set_sampler_phase(run: Run, phase: str) -> None:
    if run.sampler is not None:
        run.sampler.set_phase(phase, run.pos.epoch + 1, run.pos.global_step)


def _energy(run: Run, phase: str) -> dict:
    """energy_j of this epoch's phase, where some device could tell it (never made up); with several
    processes, over every rank's devices."""
    mine = run.sampler.energy_window(phase, run.pos.epoch + 1) if run.sampler is not None else {}
    return dist.energy_over_ranks(mine, run.world, run.dev)


def _open_sinks(run: Run, log: Callable[[str], None], extra: list) -> track.Sinks:
    if not run.world.main:  # rank 0 writes the rows
        return track.Sinks([], run.dir, log)
    p = run.pos
    kept = rundir.metrics_kept(run.cfg.resume, run.dir, p.global_step, p.epoch, p.step > 0) if run.cfg.resume else []
    run.metrics = track.MetricsFile(run.dir / "metrics.jsonl", kept)
    optimizer_text = f"{run.cfg.optimizer}\n\n```\n{run.optimizer!r}\n```"
    trackers = track.open_trackers(run.cfg, run.dir, configs.to_dict(run.cfg), optimizer_text, log)
    return track.Sinks([run.metrics, track.Console(log), *trackers, *extra], run.dir, log)


def _close(run: Run, log: Callable[[str], None]) -> None:
    """Stop the sampler and the sinks; their failures are warnings, never a second error on top of
    the one that may be on its way out."""
    for what, close in (("telemetry", run.sampler.stop if run.sampler else None),
                        ("metric sinks", run.sinks.close if run.sinks else None)):
        if close is not None:
            try:
                close()  # the sampler first: its last rows reach the sinks too
            except Exception as e:  # noqa: BLE001
                log(f"warning: closing {what} failed ({type(e).__name__}: {e})")
    if not run.world.main:
        return
    try:
        rundir.update_env(run.dir, {"telemetry": _telemetry_info(run)})
    except OSError as e:
        log(f"warning: env.json not updated ({describe_os_error(e)})")


def _telemetry_info(run: Run) -> dict:
    return run.sampler.describe() if run.sampler is not None else {"enabled": False}


def _progress_bar(run: Run):
    if not sys.stderr.isatty():
        return None
    return tqdm(total=len(run.train), initial=run.pos.step, desc=f"e{run.pos.epoch + 1}", leave=False,
                unit="batch", dynamic_ncols=True)
