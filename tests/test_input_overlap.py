"""The input of a GPU run, tested on the CPU with the CUDA API and timing events faked at their
boundary: a split kept in host memory is not pinned whole, each batch is gathered into pinned
memory and copied on a side stream that the compute stream waits for (so the copy overlaps the
step), and `data_wait_s` is the device's idle gap read from timing events, not host time."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch

from conftest import TINY
from nnperf import data
from nnperf.data import loader
from nnperf.train import inputwait

CUDA = torch.device("cuda")


def _split(n=40):
    g = torch.Generator().manual_seed(0)
    return data.Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n))


class FakeCuda:
    """torch.cuda's stream API as the copy path uses it, logging each call in order."""

    def __init__(self, log: list):
        self.log = log
        self.inside = None  # the stream whose context is open
        self.compute = self._stream("compute")

    def _stream(self, name):
        log = self.log

        class Stream:
            def __repr__(self):
                return name

            def wait_stream(self, other):
                log.append(("wait_stream", name, repr(other)))

        return Stream()

    def Stream(self, device):  # noqa: N802 - torch's name
        self.log.append(("Stream", device.type))
        return self._stream("copy")

    @contextlib.contextmanager
    def stream(self, s):
        self.inside = repr(s)
        try:
            yield
        finally:
            self.inside = None

    def current_stream(self, device):
        return self.compute


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA faked: copies to 'cuda' stay on the CPU and are logged with the stream they ran on."""
    log: list = []
    cuda = FakeCuda(log)
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            log.append(("pinned buffer",))
        return real_empty(*args, **kwargs)

    def to(self, *args, **kwargs):
        log.append(("copy", cuda.inside, kwargs.get("non_blocking", False)))
        return self

    monkeypatch.setattr(loader.torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: self)  # the epoch's order, once
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(("record_stream", repr(s))))
    real_init = loader.CopyStream.__init__
    monkeypatch.setattr(loader.CopyStream, "__init__", lambda self, device: real_init(self, device, cuda))
    monkeypatch.setattr(loader, "fits_on", lambda device, nbytes: False)
    return log


def test_a_split_too_large_for_the_gpu_is_not_pinned_whole(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.shape) or self)
    monkeypatch.setattr(loader, "fits_on", lambda device, nbytes: False)
    split = _split()
    b = loader.Batches(split, 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3)
    b.device = CUDA
    images, labels = b._place(split)
    assert images is split.images and labels is split.labels
    assert pinned == []


def test_host_batches_are_gathered_pinned_and_copied_on_a_side_stream(fake_cuda):
    split = _split()
    b = loader.Batches(split, 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3)
    b.device = CUDA  # the split stays on the host, as for a GPU it does not fit on
    index = torch.tensor([5, 1, 30])
    images, labels = b._fetch(index)
    assert torch.equal(images, split.images[index]) and torch.equal(labels, split.labels[index])
    assert fake_cuda == [("Stream", "cuda"), ("pinned buffer",), ("pinned buffer",),
                         ("copy", "copy", True), ("copy", "copy", True),  # both on the copy stream
                         ("wait_stream", "compute", "copy"),  # the step waits for the copies...
                         ("record_stream", "compute"), ("record_stream", "compute")]  # ...and keeps them alive
    fake_cuda.clear()
    b._fetch(index)
    assert ("Stream", "cuda") not in fake_cuda  # one copy stream for the run


def test_dataloader_batches_are_copied_on_the_side_stream(fake_cuda):
    lb = loader.LoaderBatches(_split(), 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3)
    lb.device = CUDA
    fetched = []
    batches = list(lb.epoch(0, fetched=lambda: fetched.append(len(fake_cuda))))
    assert len(batches) == len(fetched) == 5
    copies = [e for e in fake_cuda if e[0] == "copy"]
    assert copies == [("copy", None, True)] + [("copy", "copy", True)] * 10  # the epoch's order, then batches
    # `fetched` (the input-wait marker) comes after the compute stream waits for each batch's copies.
    waits = [i + 1 for i, e in enumerate(fake_cuda) if e[0] == "wait_stream"]
    assert [w + 2 for w in waits] == fetched  # + the two record_stream calls


class ScriptedEvent:
    """A timing event whose device timestamp (ms) is taken from a script when recorded."""

    def __init__(self, clock, done=lambda: True):
        self.clock, self.done = clock, done
        self.t = None

    def record(self):
        self.t = next(self.clock)

    def query(self):
        return self.done()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


class SlowHostLoader:
    """Batches that take `host_s` of host time each (as when the host blocks on a busy device)."""

    def __init__(self, n, host_s):
        self.n, self.host_s = n, host_s

    def epoch(self, epoch, start, fetched=None):
        for i in range(start, self.n):
            time.sleep(self.host_s)
            if fetched is not None:
                fetched()
            yield i


def test_input_wait_is_the_device_gap_between_a_step_and_the_next_batch():
    # Device timestamps (ms) recorded in order: D0, S1, D1, S2, D2, S3, D3.
    clock = iter([0.0, 5.0, 40.0, 40.0, 80.0, 83.0, 120.0])
    wait = inputwait.InputWait(torch.device("cpu"), event=lambda: ScriptedEvent(clock))
    started = time.perf_counter()
    assert list(wait.batches(SlowHostLoader(3, 0.05), 0, 0)) == [0, 1, 2]
    host = time.perf_counter() - started
    # 5 ms before the first batch, 0 (the host was ahead), 3 ms: the host's 150 ms in the iterator
    # overlapped device work and are not input wait.
    assert wait.total() == pytest.approx(0.008)
    assert host >= 0.15


def test_pending_events_are_read_at_the_epoch_end_not_waited_for_per_step():
    clock = iter([0.0, 2.0, 10.0, 12.0, 20.0])
    device_done = [False]
    wait = inputwait.InputWait(torch.device("cpu"), event=lambda: ScriptedEvent(clock, lambda: device_done[0]))
    for _ in wait.batches(SlowHostLoader(2, 0), 0, 0):
        pass
    assert wait.seconds == 0  # nothing read while the device had not passed the events
    device_done[0] = True
    assert wait.total() == pytest.approx(0.004)


def test_without_timing_events_the_wait_is_host_time_in_the_iterator():
    wait = inputwait.InputWait(torch.device("cpu"))
    assert wait.event is None
    for _ in wait.batches(SlowHostLoader(3, 0.02), 0, 1):
        time.sleep(0.05)  # the step: not input wait
    assert 0.04 <= wait.total() < 0.09


def test_a_run_with_timing_events_reports_their_gaps(run_cli, monkeypatch, tmp_path):
    stamps = iter(range(10**6))  # each event 1 ms after the previous: every gap D_i -> S_i+1 is 1 ms
    monkeypatch.setattr(inputwait, "timing_event_factory", lambda dev: lambda: ScriptedEvent(stamps))
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--no-telemetry", "--name", "w")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "runs/w/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    steps = [r["step"] for r in train]
    assert [r["data_wait_s"] for r in train] == pytest.approx([0.001 * steps[0], 0.001 * (steps[1] - steps[0])])
    env = json.loads((tmp_path / "runs/w/env.json").read_text())
    assert env["data_wait_s"].startswith("device seconds idle")
