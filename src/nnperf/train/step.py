"""One training step and one evaluation pass; top-1/top-5 counts kept on the device."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import device as devices
from .optim import SAM


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their label among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


class _FrozenBatchNormStats:
    """SAM's second pass must not update BatchNorm running statistics a second time."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.momentum for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc):
        for m, momentum in zip(self.norms, self.saved):
            m.momentum = momentum


class TrainStep:
    """Forward, backward and update for one batch in the chosen precision."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 dev: torch.device, precision: devices.Precision, label_smoothing: float = 0.0):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.dev, self.precision = dev, precision
        self.label_smoothing = label_smoothing

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with devices.autocast(self.dev, self.precision):
            logits = self.model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the batch's loss and logits, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._loss(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif isinstance(self.optimizer, SAM):
            loss.backward()

            def closure():
                with _FrozenBatchNormStats(self.model):
                    self._loss(x, y)[0].backward()

            self.optimizer.step(closure)
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model: nn.Module, batches, dev: torch.device, precision: devices.Precision) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy over every batch, and the time it took."""
    model.eval()
    devices.sync(dev)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    top1 = torch.zeros((), device=dev, dtype=torch.int64)
    top5 = torch.zeros((), device=dev, dtype=torch.int64)
    n = 0
    for x, y in batches.epoch(0):
        with devices.autocast(dev, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        top1 += topk_correct(logits, y, 1)
        top5 += topk_correct(logits, y, 5)
        n += len(y)
    devices.sync(dev)
    seconds = time.perf_counter() - start
    return {"loss": loss_sum.item() / n, "top1": top1.item() / n, "top5": top5.item() / n, "images": n,
            "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None}
