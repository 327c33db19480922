"""Glue between the training loop and the metric sinks (--tensorboard, --wandb)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import config as configs
from .. import track


@dataclass
class Tracking:
    sinks: track.Sinks
    optimizer_text: str
    losses: list = field(default_factory=list)  # this epoch's per-batch loss tensors (no sync per step)
    grad_norms: list = field(default_factory=list)  # filled by TrainStep
    first_step: int = 0
    val_batches: int = 0
    texts_sent: bool = False

    def start_epoch(self, global_step: int) -> None:
        self.losses.clear()
        self.grad_norms.clear()
        self.first_step = global_step

    def end_epoch(self, epoch: int, step: int, batch_size: int, train: dict, val: dict | None,
                  val_losses: list) -> None:
        if self.losses:
            self.sinks.batch("train_loss", torch.stack(self.losses).float().tolist(), self.first_step)
        if val_losses:
            self.sinks.batch("val_loss", torch.stack(val_losses).float().tolist(), self.val_batches)
            self.val_batches += len(val_losses)
        grad_norm, skipped = grad_norm_summary(self.grad_norms)
        scalars = {"train/loss": train["loss"], "train/top1": train["top1"], "train/top5": train["top5"],
                   "train/lr": train["lr"], "train/grad_norm": grad_norm, "train/batch_size": batch_size,
                   "train/scaler_skipped_steps": skipped,
                   "train/images_per_s": train.get("images_per_s"), "train/data_wait_s": train.get("data_wait_s"),
                   "train/energy_j": train.get("energy_j")}
        if val:
            scalars.update({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"],
                            "val/energy_j": val.get("energy_j")})
        texts = {} if self.texts_sent else {"optimizer": self.optimizer_text}
        self.texts_sent = True
        self.sinks.epoch(epoch, step, scalars, texts)

    def close(self) -> None:
        self.sinks.close()


def grad_norm_summary(norms: list) -> tuple[float | None, int | None]:
    """The mean of the epoch's finite gradient norms, and how many steps had a non-finite one (steps
    the fp16 scaler skipped); one stack and one read at the end of the epoch."""
    if not norms:
        return None, None
    stacked = torch.stack([n.float() for n in norms])
    finite = torch.isfinite(stacked)
    count = finite.sum()
    mean = torch.where(finite, stacked, 0).sum() / count.clamp_min(1)
    mean, count = torch.stack([mean, count.float()]).tolist()
    return (mean if count else None), len(norms) - int(count)


def open_tracking(cfg: configs.TrainConfig, run_dir, optimizer: torch.optim.Optimizer,
                  log: Callable[[str], None]) -> Tracking | None:
    sinks = track.open_sinks(cfg, run_dir, configs.to_dict(cfg), log)
    if sinks is None:
        return None
    text = f"{cfg.optimizer}\n\n```\n{optimizer!r}\n```"
    return Tracking(sinks, text)
