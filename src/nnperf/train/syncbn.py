"""--sync-bn: BatchNorm statistics over the whole global batch when several processes train.

On CUDA, ROCm and XPU this is PyTorch's own nn.SyncBatchNorm. PyTorch's refuses CPU tensors, so on
the CPU (Gloo) each BatchNorm becomes an AllReduceBatchNorm: the per-channel sums are all-reduced
by a differentiable sum (its backward sums the gradients over the ranks the same way), mean first, then the squared deviations from it: two passes, as batch_norm computes the
variance on one process, so that N ranks normalise as one process normalises the global batch.
Parameters and buffers keep their names: checkpoints load into a model with plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: the sum's gradient reaches every rank's input, so each rank's
    input gradient is the sum over the ranks of the output gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(t)


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the rows of every rank together."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # batch_norm computes its statistics in fp32 under autocast too
        count = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = all_reduce(xf.sum(dims)) / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        self._update_running(mean.detach(), var.detach(), count.detach())
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert(model: nn.Module, dev: torch.device) -> nn.Module:
    """`model` with every BatchNorm synchronised across the processes (in place where possible)."""
    if dev.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_all_reduce(model)


def _to_all_reduce(module: nn.Module) -> nn.Module:
    """As nn.SyncBatchNorm.convert_sync_batchnorm: the same Parameter objects (a frozen weight stays
    frozen) and buffers, in the new module."""
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        synced = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _to_all_reduce(child))
    return module
