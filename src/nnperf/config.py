"""One typed training config: a dataclass field per setting, with its help line and allowed range.

The YAML preset is read first, then command-line flags override it. `validate()` checks the
values: each field's choices and range (given beside the field), then the rules that join several
settings; its errors name the flag to fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .names import check_name

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "sam", "muon")
SAM_BASES = tuple(o for o in OPTIMIZERS if o not in ("sam", "muon"))
SCHEDULES = ("cosine", "onecycle", "step", "constant", "triangle")
PRECISIONS = ("fp32", "bf16", "fp16")
CONV_IMPLS = ("torch", "handmade")
AUGMENTS = ("auto", "none", "crop", "crop-flip")
LOADERS = ("tensor", "torch")
PAD_MODES = ("zero", "reflect")
FLIPS = ("random", "alternate")
NAN_POLICIES = ("stop", "skip")
JIT_MODES = ("eager", "compile", "trace", "script", "export")


# Settings renamed since they were first saved: old name -> new name. A config.yaml, preset or
# checkpoint that holds the old name still loads, and the old flag is still accepted (not shown).
RENAMED = {"clear_perf": "clear_telemetry"}


@dataclass(frozen=True)
class Range:
    """Allowed values of a number, between a lower bound (`min` inclusive or `above` exclusive) and an
    upper one (`max` inclusive or `below` exclusive). `text` is how an error states it ("must be
    TEXT, got VALUE"): written from the bounds and `unit`, or `must` where the bounds say it badly."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    unit: str | None = None
    must: str | None = None

    def __post_init__(self):
        if (self.min is None) == (self.above is None) or (self.max is None) == (self.below is None):
            raise ValueError("a range has one lower bound (min or above) and one upper bound (max or below)")

    def __contains__(self, value) -> bool:
        return ((value >= self.min if self.above is None else value > self.above)
                and (value <= self.max if self.below is None else value < self.below))

    @property
    def text(self) -> str:
        if self.must:
            return self.must
        if self.below is not None:  # in [0, 1), in (0, 1)
            start = f"[{_bound(self.min)}" if self.above is None else f"({_bound(self.above)}"
            text = f"in {start}, {_bound(self.below)})"
        elif self.above is not None:
            text = f"above {_bound(self.above)} and at most {_bound(self.max)}"
        else:
            text = f"{_bound(self.min)} to {_bound(self.max)}"
        return f"{text} {self.unit}" if self.unit else text


def _bound(x: float) -> str:
    """A bound as people write it: 10**9 for a large power of ten, 10000 for 1e4, 0.05 as is."""
    if isinstance(x, int) and x >= 10**6 and 10 ** (len(str(x)) - 1) == x:
        return f"10**{len(str(x)) - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def duration(value: str | float | int) -> float:
    """Seconds from "600", "600s", "10m", "1.5h" or a number of seconds (a saved config holds the number)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    number = float(text[:-1] if scale else text)  # ValueError for anything else
    return number * (scale or 1)


duration.expects = "a duration such as 600s, 10m or 1h"


def weights_source(value: str | bool) -> str | None:
    """--pretrained: "default" (the flag alone, or `pretrained: true` in YAML) or a weights file."""
    if value is True:
        return "default"
    if value is False:
        return None
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(value)


weights_source.expects = "true (the library's weights) or a weights file"


def setting(default: Any, help: str, kind: type = str, choices: tuple | None = None, *,
            min: float | None = None, max: float | None = None, above: float | None = None,
            below: float | None = None, unit: str | None = None, must: str | None = None):
    """A config field: default, one-line help, value type, allowed values, and its range (see Range)."""
    bounds = (Range(min, max, above, below, unit, must)
              if any(b is not None for b in (min, max, above, below)) else None)
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "range": bounds})


@dataclass
class TrainConfig:
    # data
    dataset: str = setting("fashion-mnist", "cifar10, cifar100, fashion-mnist, mnist, imagefolder or synthetic")
    data: str | None = setting(None, "folder with the dataset files (default: a per-dataset location)")
    download: bool = setting(True, "download CIFAR/MNIST files when they are missing", kind=bool)
    val_split: int = setting(0, "hold out this many training images for validation (chosen by --split-seed)",
                             kind=int, min=0, max=10**9, unit="images")
    split_seed: int = setting(0, "seed of the --val-split shuffle; kept apart from --seed so that runs with "
                              "different seeds are measured on the same images", kind=int,
                              min=0, max=2**63 - 1, must="0 to 2**63-1")
    image_size: int | None = setting(None, "the side of the model's input: ImageFolder images are decoded at it, "
                                     "synthetic ones made at it, the others resized on the device per batch (default: "
                                     "the data's own; with --pretrained or --init-from, what the weights expect)",
                                     kind=int, min=4, max=4096, must="between 4 and 4096")
    synthetic_size: int = setting(2048, "number of training images for --dataset synthetic", kind=int,
                                  min=1, max=10**8)
    synthetic_classes: int = setting(10, "number of classes for --dataset synthetic", kind=int,
                                     min=2, max=1000, must="between 2 and 1000")
    synthetic_channels: int = setting(3, "image channels for --dataset synthetic", kind=int)
    augment: str = setting("auto", "training augmentation: auto (crop-flip; none for MNIST and Fashion-MNIST), "
                           "none, crop, crop-flip", choices=AUGMENTS)
    crop_pad: int | None = setting(None, "padding of the random crop in pixels (default 4 from 32x32 up, else 2)",
                                   kind=int, min=0, max=64)
    pad_mode: str = setting("zero", "how the crop pads: zero or reflect", choices=PAD_MODES)
    flip: str = setting("random", "horizontal flips: random per image, or alternate (every other epoch)",
                        choices=FLIPS)
    cutout: int = setting(0, "zero a random square of this many pixels per image (0: off)", kind=int,
                          min=0, max=1024, must="0 or more pixels")
    loader: str = setting("tensor", "input path: tensor (whole dataset on the device, batched augmentation) or "
                          "torch (DataLoader with --workers, for datasets too large for the device)", choices=LOADERS)
    cache_dir: str | None = setting(None, "where decoded datasets are cached (default ~/.cache/nnperf)")
    # model
    model: str = setting("small_cifar", "model name; --model help lists them")
    conv_impl: str = setting("torch", "convolution for convnet3: torch (nn.Conv2d) or handmade (unfold+matmul)",
                             choices=CONV_IMPLS)
    width: int | None = setting(None, "base channel count of the model (default: the model's own)", kind=int,
                                min=1, max=4096, must="between 1 and 4096")
    pretrained: str | None = setting(None, "start from pretrained weights: alone, the library's default weights of a "
                                     "tv:/timm: model or effnet_lite0 (through the library's download cache); with "
                                     "FILE, a local state dict, checkpoint or .safetensors file (keys matched by "
                                     "name, the classifier head new)", kind=weights_source)
    init_from: str | None = setting(None, "start from the weights of an earlier nnperf run of the same --model (its "
                                    "RUN_DIR or a checkpoint): keys matched by name, the head new where the classes "
                                    "differ; inputs sized and normalised as that run's were")
    freeze_epochs: int = setting(0, "train only the classifier head for the first N epochs (the rest frozen, its "
                                 "BatchNorm statistics too)", kind=int, min=0, max=100_000, unit="epochs")
    head_lr: float | None = setting(None, "peak learning rate of the classifier head (default --lr)", kind=float,
                                    above=0, max=100)
    backbone_lr: float | None = setting(None, "peak learning rate of everything but the classifier head (default "
                                        "--lr)", kind=float, above=0, max=100)
    # optimisation
    epochs: int = setting(10, "training epochs", kind=int, min=1, max=100_000, must="between 1 and 100000")
    batch_size: int = setting(128, "training batch size", kind=int, min=1, max=1 << 20, must="a positive number")
    eval_batch_size: int = setting(256, "evaluation batch size", kind=int, min=1, max=1 << 20,
                                   must="a positive number")
    lr: float = setting(0.05, "peak learning rate", kind=float, above=0, max=100)
    optimizer: str = setting("nesterov", "sgd, nesterov, adam, adamw, rmsprop, adagrad, sam, or muon (Muon for "
                             "conv filters, Nesterov SGD for the rest)", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "momentum (sgd, nesterov, rmsprop, sam on sgd)", kind=float, min=0, below=1)
    weight_decay: float = setting(5e-4, "weight decay (not applied to norm and bias parameters)", kind=float,
                                  min=0, max=1e4)
    sam_rho: float = setting(0.05, "SAM neighbourhood size rho", kind=float, above=0, max=1e3)
    muon_lr: float = setting(0.24, "learning rate of the conv filters with --optimizer muon", kind=float,
                             above=0, max=10)
    muon_momentum: float = setting(0.6, "momentum of the conv filters with --optimizer muon", kind=float,
                                   min=0, below=1)
    sam_base: str = setting("sgd", "optimizer SAM wraps", choices=SAM_BASES)
    schedule: str = setting("cosine", "learning-rate schedule: cosine, onecycle, step, constant or triangle "
                            "(0.2 -> 1 over the warm-up, default 23%% of the run, then -> 0.07)", choices=SCHEDULES)
    warmup: int = setting(0, "optimizer steps of linear warm-up before the schedule", kind=int,
                          min=0, max=10**9, unit="steps")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy loss (0 to <1)", kind=float,
                                     min=0, below=1)
    decoupled: bool = setting(False, "--lr and --weight-decay in decoupled form (SGD family): lr per 1024 images "
                              "and independent of momentum, weight decay independent of lr", kind=bool)
    norm_lr_scale: float = setting(1.0, "learning-rate multiplier for normalisation-layer parameters", kind=float,
                                   above=0, max=1e4, must="above 0")
    lookahead_every: int = setting(0, "every N steps pull the weights to their moving average (0: off)", kind=int,
                                   min=0, max=10**9, unit="steps")
    lookahead_decay: float = setting(0.95, "per-step decay of that average, times (fraction of training done) cubed",
                                     kind=float, above=0, below=1)
    nan_policy: str = setting("stop", "on a non-finite training loss: stop (name the step, save nothing non-finite, "
                              "exit 3) or skip the step (counted as skipped_steps in metrics.jsonl)",
                              choices=NAN_POLICIES)
    tta: int = setting(0, "test-time augmentation: 0 none, 1 flips, 2 flips and 1-pixel translations", kind=int,
                       min=0, max=2, must="0, 1 or 2")
    time_budget: float | None = setting(None, "fit the whole run, evaluation included, into this wall time (600s, "
                                        "10m, 1h): time the first steps here, then choose --epochs to fill it",
                                        kind=duration, above=0, max=10**7, unit="seconds")
    eval_every: int = setting(1, "evaluate every N epochs (the last epoch always)", kind=int,
                              min=1, max=10**6, unit="epochs")
    # hardware
    precision: str | None = setting(None, "fp32, bf16 or fp16 (default: the device's best, see --amp)",
                                    choices=PRECISIONS)
    amp: bool | None = setting(None, "the device's best mixed precision (the default); --no-amp: fp32", kind=bool)
    channels_last: bool | None = setting(None, "NHWC memory layout (default: where the device is faster with it)",
                                         kind=bool)
    policy: str = setting("measured", "how the default precision and memory format are chosen: measured (time each "
                          "candidate once per device, model, input shape and batch; cached) or static (rules from "
                          "the device's features); --precision and --channels-last override either",
                          choices=("measured", "static"))
    jit: str = setting("eager", "the forward pass through eager, compile (torch.compile), trace or script "
                       "(TorchScript, deprecated) or export (torch.export); checkpoints stay plain state dicts",
                       choices=JIT_MODES)
    compile: bool = setting(False, "the same as --jit compile (eager if the compiler is unavailable)", kind=bool)
    device: str = setting("auto", "auto, cpu, cuda, cuda:N, xpu or mps")
    sync_bn: bool = setting(False, "several processes: BatchNorm statistics over the whole global batch "
                            "(SyncBatchNorm) instead of each rank's share", kind=bool)
    dist_timeout: float = setting(300.0, "several processes: a collective that waits longer than this (600s, 10m) "
                                  "fails with the rank that did not answer instead of hanging", kind=duration,
                                  min=1, max=86400, unit="seconds")
    workers: int = setting(0, "DataLoader worker processes for --loader torch", kind=int, min=0, max=1024)
    seed: int = setting(0, "random seed: initialisation, data order, augmentation", kind=int,
                        min=0, max=2**63 - 1, must="0 to 2**63-1")
    # telemetry
    telemetry: bool = setting(True, "record hardware telemetry into RUN/telemetry/ (--no-telemetry: off)", kind=bool)
    telemetry_interval: float = setting(0.5, "seconds between telemetry samples (0.05 or more)", kind=float,
                                        min=0.05, max=3600, must="between 0.05 and 3600 seconds")
    # run directory
    resume: str | None = setting(None, "continue a run from its checkpoint (e.g. runs/NAME/checkpoints/last.pt)")
    save_every: int = setting(0, "also keep a checkpoint every N epochs (0: never)", kind=int,
                              min=0, max=10**9, must="0 or more epochs")
    save_every_steps: int = setting(0, "also save the position to checkpoints/last.pt every N steps, mid-epoch "
                                    "(0: at each epoch's end only); a restarted or interrupted run loses less",
                                    kind=int, min=0, max=10**9, unit="steps")
    out_dir: str = setting("runs", "folder that holds run directories")
    name: str | None = setting(None, "run directory name (default: dataset-model-time)")
    overwrite: bool = setting(False, "replace an existing run directory of the same name", kind=bool)
    clear_telemetry: bool = setting(False, "remove the run's old telemetry first", kind=bool)
    tensorboard: bool = setting(False, "write TensorBoard events to RUN/tb/", kind=bool)
    wandb: bool = setting(False, "log to Weights & Biases (offline without an API key)", kind=bool)
    wandb_project: str = setting("nnperf", "W&B project for --wandb")
    report: bool = setting(False, "write RUN/report.html and RUN/plots/ when training ends (nnperf report)",
                           kind=bool)
    max_steps: int = setting(0, "stop after this many optimizer steps in all (0: no limit; for smoke runs)",
                             kind=int, min=0, max=10**12)
    log_every: int = setting(0, "also write a metrics row every N training steps (0: per epoch only)", kind=int,
                             min=0, max=10**12)


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def known_names() -> set[str]:
    """Every setting name a saved config may hold: the current ones and those renamed since."""
    return {f.name for f in fields()} | set(RENAMED)


def upgraded(values: dict) -> dict:
    """`values` with renamed settings under their current names (the current name wins if both are there)."""
    out = {}
    for name, value in values.items():
        new = RENAMED.get(name, name)
        if new == name or new not in values:
            out[new] = value
    return out


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = f.metadata["kind"]
    if value is None:
        if f.default is None:
            return None
        raise UsageError(f"{where}: needs a value (a {kind.__name__}), got nothing (null)")
    try:
        if kind is str:
            # A YAML mapping or list (`name: {a: 1}`) is never a valid string setting.
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {getattr(kind, 'expects', kind.__name__)}, got {value!r}") from None


def read_yaml_mapping(path: str | Path, label: str) -> dict:
    """A YAML file whose top level is a mapping; each problem is one line starting with `label`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{label}: {'not a regular file' if p.exists() else 'no such file'}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{label}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{label}: not a UTF-8 text file (byte {e.start}); save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{label}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def load_yaml(path: str) -> dict:
    """Read a YAML preset into {field: value}; unknown keys are an error naming the file and key."""
    raw = read_yaml_mapping(path, f"--config {path}")
    by_name = {f.name: f for f in fields()}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = RENAMED.get(name, name)
        if name not in by_name:
            raise UsageError(f"--config {path}: unknown setting '{key}' (see nnperf train --help)")
        out[name] = _coerce(by_name[name], value, f"--config {path}: {key}")
    return out


def build(preset: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then a preset, then flag overrides; validated."""
    values = {**upgraded(preset or {}), **upgraded(overrides or {})}
    by_name = {f.name: f for f in fields()}
    for name, value in values.items():
        values[name] = _coerce(by_name[name], value, flag_name(name))
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Check each setting's choices and range (given beside its field), then the rules that join
    several settings or are not ranges; the error names the flag."""
    for f in fields():
        value = getattr(cfg, f.name)
        if value is None:
            continue
        flag, choices, bounds = flag_name(f.name), f.metadata["choices"], f.metadata["range"]
        if choices and value not in choices:
            raise UsageError(f"{flag}: unknown value '{value}' (choose from {', '.join(choices)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag}: must be a finite number, got {value}")
        if bounds is not None and value not in bounds:
            raise UsageError(f"{flag}: must be {bounds.text}, got {value}")
    if cfg.name is not None:
        check_name(cfg.name, "--name")
    _check(cfg.out_dir != "", "--out-dir", "must name a folder")
    _check(cfg.init_from != "", "--init-from", "must name an earlier run's folder or one of its checkpoints")
    _check(cfg.synthetic_channels in (1, 3), "--synthetic-channels", f"must be 1 or 3, got {cfg.synthetic_channels}")
    _check(not (cfg.decoupled and cfg.optimizer not in ("sgd", "nesterov", "muon")), "--decoupled",
           "is defined for --optimizer sgd, nesterov or muon")
    _check(not (cfg.compile and cfg.jit not in ("eager", "compile")), "--compile",
           f"is --jit compile; it cannot go with --jit {cfg.jit} (drop one of them)")
    _check(not ((cfg.head_lr or cfg.backbone_lr) and cfg.optimizer == "muon"), "--head-lr/--backbone-lr",
           "set the learning rates of SGD and Adam-family optimizers, not --optimizer muon's")
    _check(not (cfg.pretrained and cfg.init_from), "--init-from",
           "cannot go with --pretrained (one source of starting weights; drop one)")
    _check(not (cfg.optimizer == "sam" and cfg.precision == "fp16"), "--optimizer sam",
           "works with --precision fp32 or bf16, not fp16 (its two passes do not fit one gradient scaler step)")


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{flag}: {message}")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
