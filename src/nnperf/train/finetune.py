"""Starting from trained weights: where they come from, the inputs they expect, and the fine-tuning
settings (a frozen backbone for the first epochs, separate head and backbone learning rates).

The weights come from the model's library (`--pretrained`, loaded in models.build), from a local
file (`--pretrained FILE`) or from an earlier nnperf run (`--init-from`). Weights were trained on
inputs of one size and normalisation; the run's batches are resized and normalised to match, on the
device (data.DataInfo.input_size), and that is saved with every checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable

from torch import nn

from .. import data
from ..config import TrainConfig
from ..errors import UsageError
from ..models import pretrained
from . import checkpoint
from .optim import NORMS

LIBRARY_WEIGHTS = "default"  # --pretrained without a FILE: the model's library's default weights


def library_weights(cfg: TrainConfig) -> bool:
    return cfg.pretrained == LIBRARY_WEIGHTS


def init_checkpoint(cfg: TrainConfig) -> tuple[str, dict] | None:
    """(path, checkpoint) of --init-from (a run directory means its checkpoints/best.pt), or None."""
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
        if not path.is_file():
            raise UsageError(f"--init-from {cfg.init_from}: the run has no checkpoints/best.pt (did its first epoch "
                             "finish?); name a checkpoint file")
    state = checkpoint.load(str(path), "--init-from")
    model = state["config"].get("model")
    if model != cfg.model:
        raise UsageError(f"--init-from {path}: a checkpoint of --model {model}; this run trains --model {cfg.model} "
                         f"(use --model {model})")
    return str(path), state


def model_inputs(cfg: TrainConfig, info: data.DataInfo, init: tuple[str, dict] | None) -> data.DataInfo:
    """The data description with the model's input size (resized on the device when the stored
    images differ) and normalisation: --image-size, else what the starting weights expect, the
    library weights' own (--pretrained; a FILE for a tv:/timm: model is taken to be that library's
    weights) or the earlier run's (--init-from); else the data's own."""
    mean, std, side, mode = info.mean, info.std, None, info.interpolation
    weights = pretrained.weights_info(cfg.model) if cfg.pretrained and pretrained.is_library(cfg.model) else None
    if weights is not None:
        mean, std = _per_channel(weights.mean, info.channels), _per_channel(weights.std, info.channels)
        side, mode = weights.input_size, weights.interpolation
    elif init is not None:
        before = data.DataInfo.from_dict(init[1]["data"])
        if before.channels == info.channels:
            mean, std = before.mean, before.std
        side, mode = before.image_size, before.interpolation
    side = cfg.image_size or side
    stored = min(info.shape[1:])
    return dataclasses.replace(info, mean=list(mean), std=list(std),
                               input_size=side if side and side != stored else None, interpolation=mode)


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    """RGB statistics for `channels`: their mean for one channel (the first convolution then sums
    its RGB filters, so a grey image reads as the same grey in colour)."""
    return list(values) if channels == len(values) else [sum(values) / len(values)] * channels


def load_initial(cfg: TrainConfig, model: nn.Module, init: tuple[str, dict] | None,
                 log: Callable[[str], None]) -> None:
    """Weights from --pretrained FILE or --init-from, matched by name (the head stays new where its
    shape differs); what was loaded, skipped and missing is logged."""
    if init is not None:
        path, state = init
        report = pretrained.load_matching(model, state["model"], "--init-from", path)
        log(f"--init-from {path}: {report.line()}")
    elif library_weights(cfg):
        weights = pretrained.weights_info(cfg.model)
        log(f"--pretrained: {weights.source if weights else cfg.model + ' weights'}, classifier head new")
    elif cfg.pretrained:
        report = pretrained.load_matching(model, pretrained.read_weights(cfg.pretrained, "--pretrained"),
                                          "--pretrained", cfg.pretrained)
        log(f"--pretrained {cfg.pretrained}: {report.line()}")


def head_parameters(model: nn.Module) -> set[int]:
    """ids of the classifier head's parameters (pretrained.head_keys names them)."""
    keys = pretrained.head_keys(model)
    return {id(p) for name, p in model.named_parameters() if name in keys}


class Freezer:
    """--freeze-epochs N: for the first N epochs only the head learns. The backbone's parameters get
    no gradients (nothing computed for them, so the optimizer leaves them and their state alone) and
    its normalisation layers stay in eval mode (running statistics unchanged, as pretrained). Whether
    an epoch is frozen depends on its number alone, so a resumed run freezes exactly as before."""

    def __init__(self, model: nn.Module, epochs: int):
        head = head_parameters(model)
        self.epochs = epochs
        self.backbone = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
        self.norms = [m for m in model.modules()
                      if isinstance(m, NORMS) and not any(id(p) in head for p in m.parameters(recurse=False))]

    def frozen(self, epoch: int) -> bool:
        return epoch < self.epochs

    @contextlib.contextmanager
    def held(self):
        """The backbone frozen for the duration (to count a frozen step's FLOPs), then as it was."""
        before = [p.requires_grad for p in self.backbone]
        for p in self.backbone:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(self.backbone, before):
                p.requires_grad_(flag)

    def apply(self, epoch: int) -> bool:
        """Call after model.train() at the start of every epoch (train() puts the norms back in
        training). True when the parameters that learn changed."""
        frozen = self.frozen(epoch)
        changed = any(p.requires_grad == frozen for p in self.backbone)
        for p in self.backbone:
            p.requires_grad_(not frozen)
        if frozen:
            for m in self.norms:
                m.eval()
        return changed


def doubts(cfg: TrainConfig) -> list[str]:
    """Warnings about fine-tuning settings that run but are probably not what was meant."""
    lines = []
    if cfg.freeze_epochs and not (cfg.pretrained or cfg.init_from):
        lines.append(f"warning: --freeze-epochs {cfg.freeze_epochs} without --pretrained or --init-from freezes "
                     "randomly initialised layers: only the head learns from them")
    if cfg.freeze_epochs >= cfg.epochs:
        lines.append(f"warning: --freeze-epochs {cfg.freeze_epochs} covers all {cfg.epochs} epochs: the whole run "
                     "trains only the classifier head (a linear probe)")
    return lines


def check_settings(cfg: TrainConfig, model_name: str) -> None:
    """Cheap checks before any data or weights are read."""
    if library_weights(cfg) and not pretrained.is_library(model_name):
        raise UsageError(f"--pretrained: --model {model_name} is one of nnperf's own models, which have no "
                         "library weights; use a tv:NAME, timm:NAME or effnet_lite0 model, or --pretrained FILE")
    if pretrained.is_library(model_name):
        pretrained.check(model_name, library_weights(cfg))
