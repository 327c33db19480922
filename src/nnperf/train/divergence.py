"""When training has diverged (--nan-policy), and the one line that says so and what to try."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import Diverged
from .step import EpochSums

if TYPE_CHECKING:
    from .build import Run

# With --nan-policy skip, this many non-finite steps in a row mean the run has diverged anyway.
MAX_SKIPPED_IN_A_ROW = 100


def count_skipped(run: Run, sums: EpochSums) -> None:
    """--nan-policy skip: count a skipped step; too many in a row end the run."""
    p = run.pos
    sums.skipped_steps += 1
    p.skipped_in_a_row += 1
    if p.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise Diverged(diagnosis(run, p.global_step + 1, f"{p.skipped_in_a_row} steps in a row had a non-finite "
                                 "loss or gradients (--nan-policy skip)"))


def check_finite(run: Run, loss: torch.Tensor, step: int) -> None:
    """--nan-policy stop: a non-finite loss ends the run here, before anything non-finite is saved."""
    if run.step.skip_nonfinite:
        return
    value = loss.item()
    if math.isfinite(value):
        run.pos.last_finite = (step, value)
        return
    raise Diverged(diagnosis(run, step, f"the training loss is {value}"))


def check_not_diverged(run: Run, val: dict | None) -> None:
    """After an epoch: weights and validation loss finite, before they are saved."""
    if not weights_finite(run):
        raise Diverged(diagnosis(run, run.pos.global_step, "the weights are no longer finite"))
    if val is not None and not math.isfinite(val["loss"]):
        raise Diverged(diagnosis(run, run.pos.global_step, f"the validation loss is {val['loss']}"))


def weights_finite(run: Run) -> bool:
    flags = [torch.isfinite(t).all() for t in run.model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def diagnosis(run: Run, step: int, what: str) -> str:
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
