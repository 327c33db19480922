"""Build what a config describes: the data splits and the model (shared by train, test and
predict), and for training the whole run, checked before anything is written."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import data, models, telemetry, track
from .. import device as devices
from ..config import PRECISIONS, TrainConfig
from ..errors import UsageError
from ..perf import flops, peak, policy
from . import checkpoint, dist, finetune, jit, rundir, syncbn
from .optim import Lookahead, make_optimizer, make_schedule
from .signals import StopRequest
from .step import EpochSums, TrainStep

# Images the data-dependent initialisation (the fast model's whitening layer) looks at.
INIT_IMAGES = 5000

SPLITS = ("train", "val", "test")


@dataclass
class Hardware:
    """Where and how the model runs, with the reasons printed and saved in env.json."""

    dev: torch.device
    precision: devices.Precision
    channels_last: bool
    layout_reason: str
    policy: dict | None = None  # what --policy measured timed and chose (env.json)

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.precision.name} ({self.precision.reason}), {layout} ({self.layout_reason})"


def choose_hardware(cfg: TrainConfig, world: dist.World = dist.SINGLE) -> Hardware:
    dev = dist.device_of(world, cfg.device)
    precision = devices.choose_precision(dev, cfg.precision, cfg.amp)
    channels_last, reason = devices.choose_channels_last(dev, precision, cfg.channels_last)
    return Hardware(dev, precision, channels_last, reason)


def choose_measured(cfg: TrainConfig, hw: Hardware, model: nn.Module, info: data.DataInfo,
                    state: dict | None) -> Hardware:
    """--policy measured: the fastest safe precision and memory format for this device, model, input
    shape and batch, timed once and cached (perf/policy.py); what the user set stays set. A resumed
    run keeps what its run started with (checkpoints from before this policy: the rules)."""
    kept = state.get("hardware") if state else None
    if state is not None:
        if not isinstance(kept, dict) or cfg.precision is not None or cfg.channels_last is not None:
            return hw
        why = "kept from the run's start (--resume)"
        return Hardware(hw.dev, devices.Precision(str(kept["precision"]), why), bool(kept["channels_last"]), why)
    precision = cfg.precision or ("fp32" if cfg.amp is False else None)
    if cfg.policy == "static" or (precision and cfg.channels_last is not None):
        return hw
    cands = policy.candidates(hw.dev, hw.precision, precision, cfg.channels_last)
    if cfg.optimizer == "sam":  # its two passes do not fit one gradient scaler step
        cands = [c for c in cands if c.precision != "fp16"] or cands
    model_id = policy.model_id(cfg.model, cfg.width, cfg.conv_impl, info.num_classes)
    fallback = policy.Candidate(hw.precision.name, hw.channels_last)
    choice = policy.choose(model, model_id, info.input_shape, info.num_classes, cfg.batch_size, hw.dev, cands, fallback)
    chosen, why = choice.candidate, choice.reason()
    layout_why = "measured with it" if precision is None else why
    return Hardware(hw.dev, devices.Precision(chosen.precision, why if precision is None else hw.precision.reason),
                    chosen.channels_last, layout_why if cfg.channels_last is None else hw.layout_reason,
                    choice.to_dict())


def step_flops_per_image(cfg: TrainConfig, model: nn.Module, info: data.DataInfo,
                         log: Callable[[str], None]) -> float | None:
    """FLOPs of one training step per image, for the parameters that need gradients now; None (and a
    warning) where FlopCounterMode cannot follow the model: it still trains, without MFU."""
    try:
        # SAM runs forward and backward twice per step.
        return flops.model_flops_per_image(model, info.input_shape, info.num_classes) * (2 if cfg.optimizer == "sam" else 1)
    except Exception as e:  # noqa: BLE001 - a model FlopCounterMode cannot follow still trains
        log(f"warning: FLOPs of {cfg.model} could not be counted ({type(e).__name__}: {e}); no MFU")
        return None


def mfu_basis(cfg: TrainConfig, model: nn.Module, info: data.DataInfo, hw: Hardware,
              log: Callable[[str], None]) -> tuple[float | None, float | None]:
    """(FLOPs of one training step per image, the device's peak FLOP/s in the run's precision): MFU's
    numerator per image/s and its denominator. Either is None where it cannot be had; MFU is then
    left out, and training goes on."""
    per_image, peak_rate = step_flops_per_image(cfg, model, info, log), None
    start = time.perf_counter()
    try:
        measuring = not peak.is_cached(hw.dev, hw.precision.name)
        peak_rate = peak.peak_flops(hw.dev, hw.precision.name)
    except Exception as e:  # noqa: BLE001
        measuring = False
        log(f"warning: the peak FLOP/s of {hw.dev} could not be measured ({type(e).__name__}: {e}); no MFU")
    if peak_rate and measuring:
        log(f"measured this device's {hw.precision.name} peak for MFU: {peak_rate / 1e9:.1f} GFLOP/s in "
            f"{time.perf_counter() - start:.1f}s (once: cached; see nnperf peak)")
    return per_image, peak_rate


@dataclass
class Splits:
    train: data.Split
    val: data.Split | None
    test: data.Split | None
    info: data.DataInfo  # saved with every checkpoint

    def get(self, name: str) -> data.Split:
        split = getattr(self, name)
        if split is None:
            hint = "--val-split N when training" if name == "val" else "--split val"
            raise UsageError(f"--split {name}: this run has no {name} split (use {hint})")
        return split


def load_splits(cfg: TrainConfig) -> Splits:
    """The dataset, with `--val-split` images held out; evaluation uses val if held out, else test."""
    ds = data.load(data.Source.of(cfg))
    train, val = (data.holdout(ds.train, cfg.val_split, cfg.split_seed) if cfg.val_split else (ds.train, None))
    if val is None and ds.test is None:
        raise UsageError(f"--val-split: {cfg.dataset} at {cfg.data} has no test split; "
                         "hold out training images with --val-split N")
    mean, std = data.channel_stats(train)
    augment = data.choose_augment(cfg.augment, cfg.dataset, min(ds.shape[1:]), crop_pad=cfg.crop_pad, flip=cfg.flip,
                                  pad_mode=cfg.pad_mode, cutout=cfg.cutout)
    info = data.DataInfo(ds.classes, ds.shape, mean, std, augment, "val" if val is not None else "test",
                         cfg.dataset, len(train), len(val if val is not None else ds.test))
    return Splits(train, val, ds.test, info)


def build_model(cfg: TrainConfig, info: data.DataInfo, dev: torch.device, channels_last: bool = False,
                pretrained: bool = False) -> nn.Module:
    """The run's model on `dev`; `pretrained`: with its library's weights (downloaded or from its cache)."""
    model = models.build(cfg.model, info.channels, info.num_classes, info.image_size, cfg.width, cfg.conv_impl,
                         pretrained=pretrained)
    model = model.to(dev)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def eval_batches(cfg: TrainConfig, split: data.Split, info: data.DataInfo, dev: torch.device,
                 channels_last: bool = False, world: dist.World = dist.SINGLE) -> data.Batches:
    """Evaluation batches; with several processes each rank takes every world-th batch whole."""
    return data.make_batches(split, cfg.eval_batch_size, dev, info.mean, info.std, loader=cfg.loader,
                             workers=cfg.workers, channels_last=channels_last,
                             shard=data.Shard(world.rank, world.size, whole_batches=True), resize=info.resize)


def train_batches(cfg: TrainConfig, split: data.Split, info: data.DataInfo, dev: torch.device,
                  channels_last: bool = False, world: dist.World = dist.SINGLE) -> data.Batches:
    """Training batches of the global --batch-size; with several processes each rank takes its rows."""
    return data.make_batches(split, cfg.batch_size, dev, info.mean, info.std, loader=cfg.loader,
                             workers=cfg.workers, shuffle=True, augment=info.augment, seed=cfg.seed,
                             channels_last=channels_last, shard=data.Shard(world.rank, world.size), resize=info.resize)

@dataclass
class Position:
    """Where training is: completed epochs, completed steps of the current epoch, the best
    evaluation so far, and what the divergence checks remember."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: dict | None = None
    last_finite: tuple | None = None  # (global step, loss as a float or a tensor) of the last finite training loss
    skipped_in_a_row: int = 0


@dataclass
class Run:
    """Everything a training run is made of."""

    cfg: TrainConfig
    dir: Path
    hw: Hardware
    info: data.DataInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    train: data.Batches
    eval: data.Batches
    step: TrainStep
    lookahead: Lookahead | None
    pos: Position = field(default_factory=Position)
    sums: EpochSums | None = None  # of a checkpoint taken mid-epoch: where that epoch's sums resume
    fresh: bool = True  # the run directory was made by this invocation
    partial_val: dict | None = None  # the evaluation where --max-steps cut an epoch short
    flops_per_image: float | None = None  # of a training step, for MFU (counted once, at setup)
    flops_per_image_frozen: float | None = None  # of a step of a --freeze-epochs epoch
    peak_flops: float | None = None  # this device's measured peak FLOP/s in the run's precision
    budget_clock: tuple[float, float] | None = None  # --time-budget: (command start, training start), monotonic
    world: dist.World = dist.SINGLE  # this process's place among the run's processes (torchrun)
    freezer: finetune.Freezer | None = None  # --freeze-epochs: which epochs train only the head
    log: Callable[[str], None] = print  # where the run's messages go
    sampler: telemetry.Sampler | None = None  # while training
    sinks: track.Sinks | None = None
    metrics: track.MetricsFile | None = None
    stop: StopRequest | None = None

    @property
    def dev(self) -> torch.device:
        return self.hw.dev

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"


def setup(cfg: TrainConfig, state: dict | None, log: Callable[[str], None]) -> Run:
    """Build everything and check it can run; the run directory is made (or reopened) last, so a
    bad setting or file leaves nothing behind."""
    world = dist.from_env()
    _check_world(cfg, world, resuming=state is not None)
    finetune.check_settings(cfg, cfg.model)
    if not state and world.main:
        for line in finetune.doubts(cfg):
            log(line)
    init = finetune.init_checkpoint(cfg) if not state else None
    hw = choose_hardware(cfg, world)
    world = dist.start(world, hw.dev, cfg.dist_timeout)
    cfg.name = dist.text_from_main(cfg.name, world, hw.dev)
    path, fresh = _run_path(cfg, state, world)
    track.check_installed(cfg)
    _check_settings(cfg, state, hw)
    splits = load_splits(cfg)
    _check_shares(cfg, world, len(splits.train))
    if state:
        _check_same_data(state["data"], splits.info, cfg.resume)
    info = data.DataInfo.from_dict(state["data"]) if state else finetune.model_inputs(cfg, splits.info, init)
    torch.manual_seed(cfg.seed)
    # A resumed run's checkpoint holds every weight: the library's are not fetched again.
    model = build_model(cfg, info, hw.dev, hw.channels_last, pretrained=finetune.library_weights(cfg) and not state)
    if state:
        checkpoint.state_matches_model(state, model, cfg.resume)
    else:
        _init_from_data(model, splits.train, info, hw.dev)
        finetune.load_initial(cfg, model, init, log if world.main else lambda line: None)
    _check_model_runs(cfg, model, info, hw)  # first: the probe below assumes a model that runs
    hw = _same_on_every_rank(choose_measured(cfg, hw, model, info, state) if world.main else hw, world)
    model = model.to(memory_format=torch.channels_last if hw.channels_last else torch.contiguous_format)
    if cfg.sync_bn and world.many:
        model = syncbn.convert(model, hw.dev)
    run = _assemble(cfg, path, hw, info, model, splits, log, world)
    run.fresh = fresh
    if world.main:  # only rank 0 logs rows; each device's peak counts once
        run.flops_per_image, peak_rate = mfu_basis(cfg, model, info, hw, log)
        run.peak_flops = peak_rate * world.size if peak_rate else None
        if run.freezer is not None and run.flops_per_image:
            with run.freezer.held():  # no weight or input gradients for the frozen layers
                run.flops_per_image_frozen = step_flops_per_image(cfg, model, info, log)
    if state:
        checkpoint.restore(run, state)
    if world.main:
        rundir.create(cfg) if fresh else rundir.prepare_resume(path)
    dist.barrier(world)  # the other ranks write their telemetry into it
    dist.training(world, cfg.dist_timeout)  # rank 0's one-off measurements are done
    return run


def _run_path(cfg: TrainConfig, state: dict | None, world: dist.World) -> tuple[Path, bool]:
    """The run directory and whether this command makes it. Rank 0 alone checks and makes it: another
    rank checking after rank 0 made it would refuse it."""
    if not world.main:
        return rundir.target(cfg), False
    return rundir.for_resume(cfg) if state else (rundir.check_new(cfg), True)


def _check_world(cfg: TrainConfig, world: dist.World, resuming: bool) -> None:
    # A run of several processes resumes on one: its --sync-bn then has nothing to synchronise.
    if cfg.sync_bn and not world.many and not resuming:
        raise UsageError("--sync-bn: needs several processes (nnperf train --nproc N, or torchrun); one process "
                         "already normalises over the whole batch")
    if not world.many:
        return
    dist.check_batch(cfg.batch_size, world.size)
    mode = "compile" if cfg.compile else cfg.jit
    if mode not in ("eager", "compile"):
        raise UsageError(f"--jit {mode}: DistributedDataParallel wraps the eager or compiled model only; use --jit "
                         "eager or compile with several processes")


def _check_shares(cfg: TrainConfig, world: dist.World, train_images: int) -> None:
    """Every rank needs images in every step: a last batch smaller than the world leaves one without."""
    last = train_images % cfg.batch_size
    if world.many and 0 < last < world.size:
        raise UsageError(f"--batch-size {cfg.batch_size}: the last batch of an epoch would hold {last} of the "
                         f"{train_images} training images, fewer than the {world.size} processes; choose a batch "
                         "size that leaves none or at least one image per process")


def _same_on_every_rank(hw: Hardware, world: dist.World) -> Hardware:
    """Rank 0's precision and memory format on every rank (only rank 0 runs the measured policy)."""
    names = list(PRECISIONS)
    index, channels_last = dist.from_main([names.index(hw.precision.name), int(hw.channels_last)], world, hw.dev)
    if names[index] == hw.precision.name and bool(channels_last) == hw.channels_last:
        return hw
    why = "rank 0's choice"
    return Hardware(hw.dev, devices.Precision(names[index], why), bool(channels_last), why, hw.policy)


def _assemble(cfg: TrainConfig, path: Path, hw: Hardware, info: data.DataInfo, model: nn.Module, splits: Splits,
              log: Callable[[str], None], world: dist.World = dist.SINGLE) -> Run:
    train = train_batches(cfg, splits.train, info, hw.dev, hw.channels_last, world)
    evals = eval_batches(cfg, splits.get(info.eval_split), info, hw.dev, hw.channels_last, world)
    optimizer = make_optimizer(cfg, model, finetune.head_parameters(model) if cfg.head_lr or cfg.backbone_lr else set())
    # --max-steps only stops early; the schedule keeps its full length so a stopped run can resume.
    scheduler = make_schedule(cfg, optimizer, len(train) * cfg.epochs)
    scaler = torch.amp.GradScaler(hw.dev.type) if hw.precision.needs_scaler else None
    forward = model_forward(cfg, model, info, hw, log, world)
    step = TrainStep(model, optimizer, scaler, hw.dev, hw.precision, cfg.label_smoothing, forward,
                     skip_nonfinite=cfg.nan_policy == "skip")
    lookahead = Lookahead(model, cfg.lookahead_every, cfg.lookahead_decay) if cfg.lookahead_every else None
    freezer = finetune.Freezer(model, cfg.freeze_epochs) if cfg.freeze_epochs else None
    return Run(cfg, path, hw, info, model, optimizer, scheduler, scaler, train, evals, step, lookahead, world=world,
               freezer=freezer, log=log)


def model_forward(cfg: TrainConfig, model: nn.Module, info: data.DataInfo, hw: Hardware,
                  log: Callable[[str], None], world: dist.World) -> nn.Module | None:
    """What the training step calls: the model under DDP with several processes and through --jit;
    None where that is the model itself."""
    parallel = dist.parallel(model, hw.dev, world, cfg.sync_bn)
    return graph_forward(cfg, parallel, info, hw, log) or (parallel if parallel is not model else None)


def refresh_forward(run: Run) -> None:
    """After --freeze-epochs changed which parameters learn: DDP's gradient buckets and a compiled
    graph are made for the parameters that need gradients, so they are made again (DDP's
    construction is a collective: every rank changes at the same epoch)."""
    if run.step.forward is not run.model:
        run.step.forward = model_forward(run.cfg, run.model, run.info, run.hw, run.log, run.world) or run.model


def graph_forward(cfg: TrainConfig, model: nn.Module, info: data.DataInfo, hw: Hardware,
                  log: Callable[[str], None]) -> nn.Module | None:
    """The model's forward through --jit (or --compile); None for eager. Made in train mode on a batch
    of the training shape and layout; evaluation runs the eager model."""
    mode = "compile" if cfg.compile else cfg.jit
    if mode == "eager":
        return None
    fmt = torch.channels_last if hw.channels_last else torch.contiguous_format
    example = torch.randn(cfg.batch_size, *info.input_shape, device=hw.dev).contiguous(memory_format=fmt)
    try:
        with torch.random.fork_rng(devices=[hw.dev] if hw.dev.type == "cuda" else []):
            return jit.make_forward(model.train(), mode, example, log)
    except jit.ModeUnavailable as e:
        raise UsageError(f"--jit {mode}: {e.why} (the other modes, or eager, may work: nnperf bench --model "
                         f"{cfg.model} --modes eager,{mode} shows which)") from None


def _check_settings(cfg: TrainConfig, state: dict | None, hw: Hardware) -> None:
    if cfg.optimizer == "sam" and hw.precision.needs_scaler:
        raise UsageError("--optimizer sam: needs --precision fp32 or bf16 on this device, not fp16")
    if state and cfg.max_steps and state["global_step"] >= cfg.max_steps:
        raise UsageError(f"--max-steps {cfg.max_steps}: the checkpoint is already at step {state['global_step']}; "
                         "raise --max-steps or drop it to train to the end of --epochs")


def _init_from_data(model: nn.Module, split: data.Split, info: data.DataInfo, dev: torch.device) -> None:
    """Data-dependent initialisation for models that have one (the fast model's whitening)."""
    if hasattr(model, "init_from_data"):
        images = split.images[:INIT_IMAGES].to(dev).float().div_(255)
        mean = torch.tensor(info.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=dev).view(1, -1, 1, 1)
        model.init_from_data((images - mean) / std)


def _check_same_data(saved: dict, info: data.DataInfo, path: str) -> None:
    """A resumed run must see the data it was trained on, or its labels and schedule no longer fit."""
    now = info.to_dict()
    for key in ("classes", "shape", "train_images", "eval_split"):
        if key in saved and saved[key] != now.get(key):
            def shown(v):
                return f"{len(v)} classes" if key == "classes" and isinstance(v, list) else v
            raise UsageError(f"--resume {path}: the data differ from the checkpoint's ({key}: {shown(saved[key])} "
                             f"then, {shown(now.get(key))} now); resume with the run's own data settings")


def _check_model_runs(cfg: TrainConfig, model: nn.Module, info: data.DataInfo, hw: Hardware) -> None:
    """One forward pass on two blank images, so that a model that cannot take this input size
    fails here, with the flags to change, before a run directory exists."""
    channels, height, width = info.input_shape
    x = torch.zeros(2, channels, height, width, device=hw.dev)
    if hw.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, AssertionError, ValueError) as e:  # ViTs assert their fixed input size
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {cfg.model}: cannot run on {channels}x{height}x{width} images ({reason}); "
                         "use another --image-size (larger, or the one size the model takes) or another --model") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, info.num_classes):
        raise UsageError(f"--model {cfg.model}: gives outputs of shape {tuple(out.shape)} for "
                         f"{info.num_classes} classes; use another --model")
