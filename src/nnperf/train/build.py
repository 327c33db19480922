"""Build the data splits and the model a config describes (shared by train, test and predict)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .. import data, models
from .. import device as devices
from ..config import TrainConfig
from ..errors import UsageError

SPLITS = ("train", "val", "test")


@dataclass
class Hardware:
    """Where and how the model runs, with the reasons printed and saved in env.json."""

    dev: torch.device
    precision: devices.Precision
    channels_last: bool
    layout_reason: str

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.precision.name} ({self.precision.reason}), {layout} ({self.layout_reason})"


def choose_hardware(cfg: TrainConfig) -> Hardware:
    dev = devices.resolve(cfg.device)
    precision = devices.choose_precision(dev, cfg.precision, cfg.amp)
    channels_last, reason = devices.choose_channels_last(dev, precision, cfg.channels_last)
    return Hardware(dev, precision, channels_last, reason)


@dataclass
class Splits:
    train: data.Split
    val: data.Split | None
    test: data.Split | None
    info: dict  # classes, shape, normalisation and augmentation: saved with every checkpoint

    def get(self, name: str) -> data.Split:
        split = getattr(self, name)
        if split is None:
            hint = "--val-split N when training" if name == "val" else "--split val"
            raise UsageError(f"--split {name}: this run has no {name} split (use {hint})")
        return split


def load_splits(cfg: TrainConfig) -> Splits:
    """The dataset, with `--val-split` images held out; evaluation uses val if held out, else test."""
    ds = data.load(cfg)
    train, val = (data.holdout(ds.train, cfg.val_split, cfg.split_seed) if cfg.val_split else (ds.train, None))
    if val is None and ds.test is None:
        raise UsageError(f"--val-split: {cfg.dataset} at {cfg.data} has no test split; "
                         "hold out training images with --val-split N")
    mean, std = data.channel_stats(train)
    channels, height, width = ds.shape
    augment = data.choose_augment(cfg, min(height, width))
    info = {"dataset": cfg.dataset, "classes": ds.classes, "shape": [channels, height, width], "mean": mean,
            "std": std, "augment": dataclasses.asdict(augment), "eval_split": "val" if val is not None else "test",
            "train_images": len(train), "eval_images": len(val if val is not None else ds.test)}
    return Splits(train, val, ds.test, info)


def build_model(cfg: TrainConfig, info: dict, dev: torch.device, channels_last: bool = False) -> nn.Module:
    channels, height, width = info["shape"]
    model = models.build(cfg.model, channels, len(info["classes"]), min(height, width), cfg.width, cfg.conv_impl)
    model = model.to(dev)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def eval_batches(cfg: TrainConfig, split: data.Split, info: dict, dev: torch.device, channels_last: bool = False):
    return data.make_batches(split, cfg.eval_batch_size, dev, info["mean"], info["std"], loader=cfg.loader,
                             workers=cfg.workers, channels_last=channels_last)


def train_batches(cfg: TrainConfig, split: data.Split, info: dict, dev: torch.device, channels_last: bool = False):
    return data.make_batches(split, cfg.batch_size, dev, info["mean"], info["std"], loader=cfg.loader,
                             workers=cfg.workers, shuffle=True, augment=data.Augment(**info["augment"]),
                             seed=cfg.seed, channels_last=channels_last)
