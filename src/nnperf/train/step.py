"""One training step and one evaluation pass; top-1/top-5 counts kept on the device."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import device as devices
from . import dist
from .optim import SAM

# Memory exhausted is no compiler failure: it is left to the run's own handling, compiled or not.
OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


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


@dataclass
class StepResult:
    """What one training step gives back, all detached tensors (read without a sync only at the
    epoch's end): the batch's mean loss and logits, the total gradient norm when asked for (inf or
    NaN when the fp16 scaler skipped the update), and whether --nan-policy skip left the weights."""

    loss: torch.Tensor
    logits: torch.Tensor
    grad_norm: torch.Tensor | None = None
    skipped: bool = False


class TrainStep:
    """Forward, backward and update for one batch in the chosen precision."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 dev: torch.device, precision: devices.Precision, label_smoothing: float = 0.0,
                 forward: nn.Module | None = None, skip_nonfinite: bool = False, grad_norm: bool = False):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.forward = forward or model
        self.dev, self.precision = dev, precision
        self.label_smoothing = label_smoothing
        # Each step's total gradient norm, as a tensor (no sync per step), when a sink plots it.
        self.grad_norm = grad_norm
        # --nan-policy skip: a step whose loss or gradients are not finite leaves the weights as they
        # were. Deciding needs the values on the host, one sync per step, so only when asked for.
        self.skip_nonfinite = skip_nonfinite
        # Several processes: what this rank's mean loss is weighted by in backward, so that DDP's
        # mean of the ranks' gradients is the global batch's (train/dist.loss_weight).
        self.loss_weight = 1.0

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = torch.isfinite(loss)
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        return not bool(finite)

    def _total_grad_norm(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).detach() if self.grad_norm and grads else None

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with devices.autocast(self.dev, self.precision):
            logits = self.forward(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits

    def _backward(self, loss: torch.Tensor) -> None:
        if self.loss_weight != 1.0:
            loss = loss * self.loss_weight
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed gradients, then forward and backward. A compiled graph whose backward fails (compiled
        lazily, at the first backward) falls back like a failed forward: this batch again, eagerly, and
        eager from then on."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._loss(x, y)
        try:
            self._backward(loss)
        except Exception as e:
            fwd = self.forward
            if not isinstance(fwd, CompiledOrEager) or fwd.failed or isinstance(e, OUT_OF_MEMORY):
                raise
            fwd.fall_back(e, "in backward ")
            del loss, logits  # the failed graph, before the eager pass allocates its own
            self.optimizer.zero_grad(set_to_none=True)
            loss, logits = self._loss(x, y)
            self._backward(loss)
        return loss, logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        loss, logits = self._forward_backward(x, y)
        if self.scaler is not None:
            return self._scaled_update(loss, logits)
        if self.skip_nonfinite and self._nonfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss.detach(), logits.detach(), skipped=True)
        norm = self._total_grad_norm()
        if isinstance(self.optimizer, SAM):
            def closure():
                with _FrozenBatchNormStats(self.model):
                    self._backward(self._loss(x, y)[0])

            self.optimizer.step(closure)
        else:
            self.optimizer.step()
        return StepResult(loss.detach(), logits.detach(), norm)

    def _scaled_update(self, loss: torch.Tensor, logits: torch.Tensor) -> StepResult:
        """fp16: the scaler itself skips an update whose gradients overflowed (and lowers its scale)."""
        norm = None
        if self.grad_norm or self.skip_nonfinite:
            self.scaler.unscale_(self.optimizer)  # the norm of the true gradients
            norm = self._total_grad_norm()
        skipped = self.skip_nonfinite and self._nonfinite(loss)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss.detach(), logits.detach(), norm, skipped)


@dataclass
class EpochSums:
    """What an epoch's training measured so far. Loss and accuracy counts stay tensors on the device
    (no sync per step; float64 where the device has it, so a resumed epoch adds up bit for bit the
    same); per-batch losses and gradient norms are kept only when a sink wants them."""

    loss: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor
    images: int = 0
    seconds: float = 0.0
    data_wait_s: float = 0.0
    skipped_steps: int = 0
    batch_losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    first_step: int = 0  # the global step of the first batch loss kept

    SAVED = ("loss", "top1", "top5", "images", "seconds", "data_wait_s", "skipped_steps")

    @classmethod
    def zero(cls, dev: torch.device) -> "EpochSums":
        return cls(torch.zeros((), dtype=devices.accumulator_dtype(dev), device=dev),
                   torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev))

    @classmethod
    def restored(cls, saved: dict, dev: torch.device) -> "EpochSums":
        """From a checkpoint's "sums" (older checkpoints may lack some)."""
        sums = cls.zero(dev)
        for key in cls.SAVED:
            if key in saved:
                value, now = saved[key], getattr(sums, key)
                setattr(sums, key, value.to(dev, now.dtype) if isinstance(now, torch.Tensor) else value)
        return sums

    def state(self) -> dict:
        return {key: getattr(self, key) for key in self.SAVED}

    def add(self, result: StepResult, labels: torch.Tensor, keep_batches: bool) -> None:
        self.loss += result.loss.to(self.loss.dtype) * len(labels)
        self.top1 += topk_correct(result.logits, labels, 1)
        self.top5 += topk_correct(result.logits, labels, 5)
        self.images += len(labels)
        if keep_batches:
            self.batch_losses.append(result.loss)
            if result.grad_norm is not None:
                self.grad_norms.append(result.grad_norm)

    def means(self) -> dict:
        """Mean loss, top-1 and top-5 of the images so far."""
        n = max(1, self.images)
        return {"loss": self.loss.item() / n, "top1": self.top1.item() / n, "top5": self.top5.item() / n}


def grad_norm_summary(norms: list) -> tuple[float | None, int | None]:
    """The mean of an epoch's finite gradient norms, and how many steps had a non-finite one (steps
    the fp16 scaler skipped); one stack and one read at the end of the epoch."""
    if not norms:
        return None, None
    stacked = torch.stack([n.float() for n in norms])
    finite = torch.isfinite(stacked)
    count = finite.sum()
    mean = torch.where(finite, stacked, 0).sum() / count.clamp_min(1)
    mean, count = torch.stack([mean, count.float()]).tolist()
    return (mean if count else None), len(norms) - int(count)


def tta_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Logits averaged over test-time augmentations: level 1 adds the mirror image, level 2 also
    the (mirrored) images shifted by one pixel up-left and down-right (reflect padding)."""
    logits = model(x)
    if level == 0:
        return logits
    mirrored = 0.5 * (logits + model(x.flip(-1)))
    if level == 1:
        return mirrored
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
    shifted_logits = torch.stack([0.5 * (model(s) + model(s.flip(-1))) for s in shifted]).mean(0)
    return 0.5 * mirrored + 0.5 * shifted_logits


@torch.no_grad()
def evaluate(model: nn.Module, batches, dev: torch.device, precision: devices.Precision, tta: int = 0,
             batch_losses: list | None = None, world: dist.World = dist.SINGLE) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy over every batch, and the time it took; each
    batch's mean loss is appended to `batch_losses` if given. With several processes each rank
    evaluates its own batches and the sums are added over the ranks: the figures of the whole split."""
    model.eval()
    devices.sync(dev)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=dev, dtype=devices.accumulator_dtype(dev))
    top1 = torch.zeros((), device=dev, dtype=torch.int64)
    top5 = torch.zeros((), device=dev, dtype=torch.int64)
    n = 0
    for x, y in batches.epoch(0):
        with devices.autocast(dev, precision):
            logits = tta_logits(model, x, tta).float()
        batch_loss = F.cross_entropy(logits, y, reduction="sum").to(loss_sum.dtype)
        loss_sum += batch_loss
        if batch_losses is not None:
            batch_losses.append(batch_loss / len(y))
        top1 += topk_correct(logits, y, 1)
        top5 += topk_correct(logits, y, 5)
        n += len(y)
    if world.many:
        count = torch.tensor(float(n), dtype=torch.float64, device=dev)
        totals = torch.stack([loss_sum.double(), top1.double(), top5.double(), count])
        loss_sum, top1, top5, n = (*dist.all_sum(totals, world)[:3], int(totals[3].item()))
    devices.sync(dev)
    seconds = dist.all_max(time.perf_counter() - start, world, dev)
    return {"loss": loss_sum.item() / n, "top1": top1.item() / n, "top5": top5.item() / n, "images": n,
            "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None}


class CompiledOrEager(nn.Module):
    """The model through torch.compile; if compiling fails (no compiler, unsupported backend), one
    message and the eager model from then on. Weights are shared, so checkpoints are unaffected.
    A failure in the compiled backward surfaces outside forward(): TrainStep catches it and calls
    `fall_back`."""

    def __init__(self, model: nn.Module, log):
        super().__init__()
        self.eager = model
        self.compiled = torch.compile(model)
        self.log = log
        self.failed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                self.fall_back(e)
        return self.eager(x)

    def fall_back(self, e: BaseException, where: str = "") -> None:
        """Eager from now on, with one message."""
        if self.failed:
            return
        self.failed = True
        first = (str(e).splitlines() or [""])[0][:120]
        self.log(f"--compile: torch.compile failed {where}({type(e).__name__}: {first}); running eager")
