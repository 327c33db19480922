"""Optimizers (SGD family, Adam family, RMSprop, Adagrad, SAM) and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import UsageError


NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_lr_scale: float = 1.0,
                 decay_all: bool = False) -> list[dict]:
    """Three groups: weights (decayed), biases, and normalisation-layer parameters (learning rate
    times `norm_lr_scale`). Biases and norm parameters are decayed only with `decay_all`: decaying
    them usually only hurts, but the decoupled recipe decays everything by the same amount."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    weights, biases, norms = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (norms if id(p) in norm_ids else weights if p.ndim > 1 else biases).append(p)
    other_decay = weight_decay if decay_all else 0.0
    # SGD's decay step is lr * weight_decay: dividing by the lr scale keeps the decay itself equal.
    return [{"params": weights, "weight_decay": weight_decay},
            {"params": biases, "weight_decay": other_decay},
            {"params": norms, "weight_decay": other_decay / norm_lr_scale, "lr_scale": norm_lr_scale}]


def decoupled_sgd(lr: float, weight_decay: float, momentum: float, batch_size: int) -> tuple[float, float]:
    """(SGD lr, SGD weight_decay) from the decoupled form of the airbench recipes: `lr` is the step
    size per 1024 images independent of momentum, `weight_decay` the decay per 1024 images
    independent of lr. For the mean loss over a batch of `batch_size` images."""
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    return lr * batch_size / kilostep, weight_decay / lr


# --optimizer NAME -> builder(cfg, param groups, lr): the optimizer for those groups. Each group may
# carry an "lr_scale" (see param_groups), which a builder applies with scaled_lr (or not at all).
Builder = Callable[[TrainConfig, list, float], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}
# The plain torch optimizers, which SAM can also wrap: NAME -> arguments(cfg) -> (class, its arguments
# besides the lr and the weight decay, which are set per parameter group).
SAM_BASES: dict[str, Callable[[TrainConfig], tuple[type, dict]]] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Add a builder to OPTIMIZERS under `name` (config.OPTIMIZERS lists the same names for --help)."""
    def add(build: Builder) -> Builder:
        OPTIMIZERS[name] = build
        return build
    return add


def register_torch(name: str, cls: type, arguments: Callable[[TrainConfig], dict] = lambda cfg: {}) -> None:
    """A torch.optim optimizer, both on its own and as a base of SAM."""
    SAM_BASES[name] = lambda cfg: (cls, arguments(cfg))
    register(name)(lambda cfg, groups, lr: cls(scaled_lr(groups, lr), lr=lr, **arguments(cfg)))


def scaled_lr(groups: list[dict], lr: float) -> list[dict]:
    """Each group's learning rate: `lr` times its lr_scale."""
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    return groups


def _nesterov(cfg: TrainConfig) -> dict:
    if cfg.momentum <= 0:
        raise UsageError("--momentum: --optimizer nesterov needs momentum above 0")
    return {"momentum": cfg.momentum, "nesterov": True}


register_torch("sgd", torch.optim.SGD, lambda cfg: {"momentum": cfg.momentum})
register_torch("nesterov", torch.optim.SGD, _nesterov)
register_torch("adam", torch.optim.Adam)
register_torch("adamw", torch.optim.AdamW)
register_torch("rmsprop", torch.optim.RMSprop, lambda cfg: {"momentum": cfg.momentum})
register_torch("adagrad", torch.optim.Adagrad)


@register("sam")
def _sam(cfg: TrainConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    cls, kwargs = SAM_BASES[cfg.sam_base](cfg)
    return SAM(scaled_lr(groups, lr), cls, rho=cfg.sam_rho, lr=lr, **kwargs)


@register("muon")
def _muon(cfg: TrainConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    # The groups' lr_scale stays unapplied, as it always has with Muon (they run at `lr`).
    return Muon.for_groups(groups, lr, cfg.momentum, cfg.muon_lr, cfg.muon_momentum)


def split_head(groups: list[dict], head: set[int], head_scale: float, backbone_scale: float) -> list[dict]:
    """Each group split in two, the classifier head's parameters (ids in `head`) and the rest, their
    learning rates scaled by `head_scale` and `backbone_scale` (on top of any lr_scale)."""
    out = []
    for group in groups:
        for scale, params in ((backbone_scale, [p for p in group["params"] if id(p) not in head]),
                              (head_scale, [p for p in group["params"] if id(p) in head])):
            if params:
                out.append({**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * scale})
    return out


def make_optimizer(cfg: TrainConfig, model: nn.Module, head: set[int] = frozenset()) -> torch.optim.Optimizer:
    """The optimizer of `model`; `head` (parameter ids) gets --head-lr, the rest --backbone-lr."""
    lr, weight_decay = cfg.lr, cfg.weight_decay
    if cfg.decoupled:
        lr, weight_decay = decoupled_sgd(cfg.lr, cfg.weight_decay, cfg.momentum, cfg.batch_size)
    groups = param_groups(model, weight_decay, cfg.norm_lr_scale, decay_all=cfg.decoupled)
    if cfg.head_lr or cfg.backbone_lr:
        groups = split_head(groups, head, (cfg.head_lr or cfg.lr) / cfg.lr, (cfg.backbone_lr or cfg.lr) / cfg.lr)
    return OPTIMIZERS[cfg.optimizer](cfg, groups, lr)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021) around any base optimizer.

    Each step: the gradient at w moves the weights to w + rho * g / |g| (the locally worst point),
    the gradient taken there is applied by the base optimizer at the original w.
    """

    def __init__(self, params, base_cls: type, rho: float = 0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base = base_cls(self.param_groups, **kwargs)
        # One set of groups, so schedules that change the lr reach the base optimizer.
        self.param_groups = self.base.param_groups
        for group in self.param_groups:
            group.setdefault("rho", rho)

    @torch.no_grad()
    def perturb(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def restore_and_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                e_w = self.state[p].pop("e_w", None)
                if e_w is not None:
                    p.sub_(e_w)
        self.base.step()

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SAM needs a closure that recomputes the loss and its gradients")
        self.perturb()
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure()
        self.restore_and_step()

    # The base optimizer holds the state worth saving (momentum, moments); e_w lives only in a step.
    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict):
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


def orthogonalise(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to `g` (U V^T of its SVD), by a quintic
    Newton-Schulz iteration tuned to push all singular values near 1 in few steps (Muon, K. Jordan)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for convolution filters, Nesterov SGD for every other parameter.

    A filter bank's update is its Nesterov momentum made orthogonal (all singular values ~1), so
    every direction of the filter space moves at the same rate. Filters followed by BatchNorm are
    scale-free, so their norm is held fixed and the learning rate stays a true step size.
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False))

    @classmethod
    def for_groups(cls, groups: list[dict], lr: float, momentum: float, muon_lr: float, muon_momentum: float):
        """Split the 4-D weights (conv filters) out of `groups` into a Muon group."""
        filters = [p for p in groups[0]["params"] if p.ndim == 4]
        groups[0]["params"] = [p for p in groups[0]["params"] if p.ndim != 4]
        muon = {"params": filters, "lr": muon_lr, "momentum": muon_momentum, "weight_decay": 0.0, "muon": True}
        return cls([g for g in groups if g["params"]] + [muon], lr, momentum)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["muon"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(momentum).add_(g)
                update = g.add(buf, alpha=momentum)  # Nesterov
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    update = orthogonalise(update.reshape(len(p), -1)).view_as(p)
                p.add_(update, alpha=-lr)


@dataclass
class Schedule:
    """Learning-rate factor per optimizer step: linear warm-up, then the named shape."""

    kind: str
    total: int
    warmup: int

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            return self._onecycle(step)
        if self.kind == "triangle":
            return self._triangle(step)
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0

    def _onecycle(self, step: int) -> float:
        # Up from 1/25 of the peak over the warm-up (default 25% of the run), then cosine to zero.
        up = self.warmup or max(1, round(0.25 * self.total))
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * step / up
        t = min(1.0, (step - up) / max(1, self.total - up))
        return 0.5 * (1 + math.cos(math.pi * t))


    def _triangle(self, step: int) -> float:
        # airbench's shape: from 0.2 up to the peak over the warm-up (default 23%), then down to 0.07.
        up = self.warmup or max(1, round(0.23 * self.total))
        if step < up:
            return 0.2 + 0.8 * step / up
        return 1 - 0.93 * min(1.0, (step - up) / max(1, self.total - up))


class Lookahead:
    """Every few steps, move a moving average of the weights (and BatchNorm statistics) towards the
    current ones and set the weights to it (hlb-cifar10's lookahead). Its decay grows with the
    cube of the fraction of training done: no averaging early, when the weights must move, and
    strong smoothing at the end."""

    def __init__(self, model: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, progress: float) -> None:
        decay = self.decay ** self.every * progress ** 3
        for key, value in model.state_dict().items():
            if key in self.average:
                self.average[key].lerp_(value, 1 - decay)
                value.copy_(self.average[key])

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """End of training: the weights become the average."""
        for key, value in model.state_dict().items():
            if key in self.average:
                value.copy_(self.average[key])


def make_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg.schedule, total_steps, cfg.warmup))
