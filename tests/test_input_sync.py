"""The tensor input path issues no blocking host->device copy per batch (a blocking copy waits for all
the device's queued work: a hidden sync per step, charged to `data_wait_s`), and its batches stay
exact: the numbers of CPU runs, and resume mid-epoch with draws made on the device."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nnperf import data
from nnperf.data import augment, loader

AUGMENTS = [augment.Augment(crop=True, pad=2, flip="random", cutout=3),
            augment.Augment(crop=True, pad=2, pad_mode="reflect", flip="alternate")]


def _split(n=50):
    g = torch.Generator().manual_seed(0)
    return data.Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n))


def _device_target(args, kwargs) -> bool:
    """Whether a Tensor.to call names a device (rather than only a dtype)."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


class BlockingCopies(TorchFunctionMode):
    """Records every `.to(device)` / `.cuda()` made without non_blocking=True."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and not kwargs.get("non_blocking", False):
            if func is torch.Tensor.cuda or _device_target(args, kwargs):
                self.calls.append((func.__name__, tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)))
        return func(*args, **kwargs)


def _accelerator_draws(monkeypatch):
    """Run the accelerator branch (draws made on the batch's device) on the CPU."""
    monkeypatch.setattr(loader, "draws_on_host", lambda device: False, raising=False)


@pytest.mark.parametrize("aug", AUGMENTS)
@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_no_blocking_copy_per_batch(monkeypatch, aug, kind):
    _accelerator_draws(monkeypatch)
    cls = loader.Batches if kind == "tensor" else loader.LoaderBatches
    b = cls(_split(), 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3, shuffle=True, augment=aug, seed=3)
    it = b.epoch(1)
    next(it)  # the first batch may place per-epoch state (the order) on the device
    with BlockingCopies() as spy:
        rest = list(it)
    assert len(rest) == len(b) - 1
    assert spy.calls == [], f"blocking host->device copies per batch: {spy.calls[:5]}"


@pytest.mark.parametrize("aug", AUGMENTS)
def test_device_draws_resume_exactly_and_loaders_agree(monkeypatch, aug):
    _accelerator_draws(monkeypatch)
    b = loader.Batches(_split(), 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3, shuffle=True, augment=aug, seed=3)
    lb = loader.LoaderBatches(_split(), 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3, shuffle=True, augment=aug,
                              seed=3)
    for epoch in (0, 1):
        whole = list(b.epoch(epoch))
        resumed = list(b.epoch(epoch, start=3))
        for (x, y), (rx, ry) in zip(whole[3:], resumed, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        for (x, y), (lx, ly) in zip(whole, lb.epoch(epoch), strict=True):
            assert torch.equal(x, lx) and torch.equal(y, ly)


@pytest.mark.parametrize("aug", AUGMENTS)
def test_cpu_runs_keep_their_host_draws(aug):
    """CPU runs draw exactly as before: a host generator seeded from (seed, "augment", epoch, step)."""
    split, seed, epoch, bs = _split(), 3, 1, 8
    b = loader.Batches(split, bs, torch.device("cpu"), [0.0] * 3, [1 / 255] * 3, shuffle=True, augment=aug, seed=seed)
    order = b.order(epoch)
    flip_base = torch.rand(len(split), generator=torch.Generator().manual_seed(augment.derive_seed(seed, "flip"))) < 0.5
    for step, (x, _) in enumerate(b.epoch(epoch)):
        index = order[step * bs:(step + 1) * bs]
        gen = torch.Generator().manual_seed(augment.derive_seed(seed, "augment", epoch, step))
        d = augment.draw(len(index), aug.pad, aug.flip == "random", gen, (8, 8), aug.cutout)
        if aug.flip == "alternate":
            d.flip = flip_base[index] ^ bool(epoch % 2)
        expected = augment.crop_flip(split.images[index], d, aug.pad, aug.pad_mode, aug.cutout)
        assert torch.equal(x, expected.float())


def test_host_tensors_reach_cuda_pinned_and_non_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: calls.append((a, kw)) or self)
    loader.to_device(torch.zeros(3), torch.device("cuda"))
    assert calls == ["pin", ((torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    loader.to_device(torch.zeros(3), torch.device("mps"))  # MPS: non_blocking from pageable memory is unsafe
    assert calls == [((torch.device("mps"),), {})]
