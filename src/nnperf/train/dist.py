"""Several processes, one run: torchrun (torch.distributed.elastic) and DistributedDataParallel.

torchrun starts one process per device and tells each its place through the environment (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT); each process runs the same `nnperf
train`. --batch-size stays the global batch: every rank takes its contiguous share of each global
batch (data/loader.py shards it), DDP averages the gradients, and evaluation is split by whole
batches and summed, so N ranks train on exactly the images, and evaluate exactly the figures, that
one process would. Rank 0 writes the run directory; every rank computes the same values.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import device as devices
from ..errors import UsageError


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    host: str = ""
    backend: str = ""
    hosts: tuple[str, ...] = ()  # every rank's host, once the process group is up

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def describe(self) -> dict:
        return {"world_size": self.size, "local_world_size": self.local_size, "backend": self.backend,
                "hosts": list(self.hosts), "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}


SINGLE = World(host=socket.gethostname())


HOST_BYTES = 64


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise UsageError(f"{name}={text!r} in the environment is not a number (torchrun sets it)") from None


def from_env() -> World:
    """The world torchrun described, or SINGLE outside torchrun (or with one process)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    return World(rank, local, size, _env_int("LOCAL_WORLD_SIZE", 1), socket.gethostname())


def backend_for(dev: torch.device) -> str:
    """NCCL on CUDA and ROCm (RCCL answers to the same name), XCCL on XPU, Gloo on the CPU."""
    if dev.type == "cuda":
        return "nccl"
    if dev.type == "xpu":
        if not getattr(dist, "is_xccl_available", lambda: False)():
            raise UsageError("--device xpu: this PyTorch has no XCCL backend for several processes on XPU "
                             "(install a PyTorch built with it, or train on one process)")
        return "xccl"
    if dev.type == "cpu":
        return "gloo"
    raise UsageError(f"--device {dev.type}: several processes need cuda, xpu or cpu devices, not {dev.type}")


def device_of(world: World, spec: str) -> torch.device:
    """The device of this rank: --device's kind, numbered by LOCAL_RANK (cuda:LOCAL_RANK)."""
    dev = devices.resolve(spec)
    if not world.many or dev.type == "cpu":
        return dev
    count = torch.cuda.device_count() if dev.type == "cuda" else torch.xpu.device_count() if dev.type == "xpu" else 1
    if world.local_rank >= count:
        raise UsageError(f"rank {world.rank} (local rank {world.local_rank}) on {world.host}: only {count} "
                         f"{dev.type} device(s) here; start at most {count} processes per node")
    return torch.device(dev.type, world.local_rank)


SETUP_TIMEOUT_S = 1800.0  # while rank 0 alone measures the policy and the peak (a minute on a slow CPU)


def start(world: World, dev: torch.device, timeout_s: float) -> World:
    """Join the process group. Until `training()` a collective may wait SETUP_TIMEOUT_S (or
    `timeout_s` if longer), then `timeout_s`; beyond it, it fails instead of hanging."""
    if not world.many:
        return world
    backend = backend_for(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S))
    try:
        dist.init_process_group(backend, timeout=timeout, rank=world.rank, world_size=world.size,
                                store=_store(world, timeout))
    except (RuntimeError, TimeoutError, ValueError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        first = " ".join(str(e).split())[:160] or type(e).__name__
        raise UsageError(f"rank {world.rank} on {world.host}: cannot join the other processes at {where} within "
                         f"--dist-timeout {timeout_s:g}s ({first}); check torchrun's --rdzv-endpoint and that every "
                         "node can reach it") from None
    joined = replace(world, backend=backend)
    return replace(joined, hosts=hosts(joined, dev))


def _store(world: World, timeout: timedelta) -> dist.Store:
    """torchrun's store (its agent serves it, or rank 0 does), with this attempt's keys apart: after a
    restart (--max-restarts) the keys of the attempt that failed are still in it, and Gloo read a dead
    rank's address from them (connection refused) until each attempt got a prefix of its own."""
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT", 29500)
    served = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, world.size, is_master=not served and world.main, timeout=timeout,
                          multi_tenant=not served)
    return dist.PrefixStore(f"nnperf/attempt{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


_training = False  # set once setup is over on every rank


def training(world: World, timeout_s: float) -> None:
    """From here on a collective waits at most `timeout_s` (--dist-timeout)."""
    global _training
    _training = True
    if world.many and hasattr(dist, "set_timeout"):
        dist.set_timeout(timedelta(seconds=timeout_s))


def is_training() -> bool:
    return _training


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parallel(model: torch.nn.Module, dev: torch.device, world: World, synced_norms: bool = False) -> torch.nn.Module:
    """The model under DistributedDataParallel with several processes (it broadcasts rank 0's weights
    and buffers, then averages the gradients in backward); the model itself with one. Without
    --sync-bn DDP also copies rank 0's BatchNorm statistics to every rank before each forward (3.8 ms
    of small_cifar's 110 ms step on 2 Gloo processes); with it they are the same on every rank.
    Parameters that need no gradient when it is made (a frozen backbone) are left out of its
    all-reduce: build.refresh_forward makes it again when they thaw."""
    if not world.many:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    # The flag's name since PyTorch 2.12 (both sync at init); broadcast_buffers before it.
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type in ("cuda", "xpu") else None,
                                   **{sync: not synced_norms})


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over the ranks (in place; `t` itself with one process)."""
    if world.many:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(value: float, world: World, dev: torch.device) -> float:
    if not world.many:
        return value
    t = torch.tensor([value], dtype=torch.float64 if dev.type != "mps" else torch.float32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def from_main(values: list[int], world: World, dev: torch.device) -> list[int]:
    """Rank 0's `values` on every rank. Numbers only: nothing pickled crosses between processes."""
    if not world.many:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def text_from_main(text: str, world: World, dev: torch.device) -> str:
    """Rank 0's `text` on every rank (a default run name holds the time, which ranks may read a second apart)."""
    if not world.many:
        return text
    data = list(text.encode("utf-8"))
    (length,) = from_main([len(data)], world, dev)
    data = (data + [0] * length)[:length]
    return bytes(from_main(data, world, dev)).decode("utf-8")


def check_batch(batch_size: int, processes: int) -> None:
    """The global batch must divide among the processes: say the nearest sizes that do."""
    if batch_size % processes:
        lower = batch_size // processes * processes
        sizes = " or ".join(str(b) for b in (lower, lower + processes) if b > 0)
        raise UsageError(f"--batch-size {batch_size}: the global batch must divide among {processes} processes; "
                         f"use {sizes}")


def loss_weight(world: World, local_rows: int, global_rows: int) -> float:
    """What a rank's mean loss is multiplied by so that DDP's mean of the ranks' gradients is the
    gradient of the global batch's mean loss when shares differ (the last batch of an epoch)."""
    return world.size * local_rows / global_rows if world.many and global_rows else 1.0


def summed(sums, world: World, dev: torch.device):
    """An epoch's EpochSums over every rank: losses, counts and images added; seconds and input wait
    the slowest rank's (the step waits for it)."""
    if not world.many:
        return sums
    totals = torch.stack([sums.loss.double(), sums.top1.double(), sums.top5.double(),
                          torch.tensor(float(sums.images), dtype=torch.float64, device=dev)])
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    slowest = torch.tensor([sums.seconds, sums.data_wait_s], dtype=torch.float64, device=dev)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss, top1, top5, images = totals
    seconds, wait = slowest.tolist()
    return replace(sums, loss=loss.to(sums.loss.dtype), top1=top1.round().to(torch.int64),
                   top5=top5.round().to(torch.int64), images=int(images.item()), seconds=seconds, data_wait_s=wait)


class StopVote:
    """Several processes stop after the same step. After each step every rank adds its signal (the
    largest number wins) to an all-reduce that it does not wait for; the result is read after the next
    step, so all ranks see the same answer at the same step, and the host waits for nothing that the
    loop's one-step-late loss check does not already wait for. One process: the signal, at once."""

    def __init__(self, world: World, dev: torch.device):
        self.world, self.dev = world, dev
        self.pending: tuple | None = None

    def _send(self, signum: int | None, wait: bool):
        t = torch.tensor([signum or 0], dtype=torch.int64, device=self.dev)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=not wait)
        return work, t

    def _read(self) -> int | None:
        if self.pending is None:
            return None
        work, t = self.pending
        self.pending = None
        if work is not None:
            work.wait()
        return int(t.item()) or None

    def after_step(self, signum: int | None) -> int | None:
        if not self.world.many:
            return signum
        agreed = self._read()
        self.pending = self._send(signum, wait=False)
        return agreed

    def now(self, signum: int | None) -> int | None:
        """Every rank's answer now (a blocking all-reduce): at an epoch's start."""
        if not self.world.many:
            return signum
        self._read()
        self.pending = self._send(signum, wait=True)
        return self._read()


def energy_over_ranks(mine: dict, world: World, dev: torch.device) -> dict:
    """energy_j of an epoch's phase over every rank's devices, each device once: a rank's accelerator
    is its own, the CPU package is shared by the ranks of a host (local rank 0 counts it). {} unless
    every rank could tell its energy (never a made-up value)."""
    if not world.many:
        return mine
    by_device = mine.get("energy_by_device_j") or ({"": mine["energy_j"]} if "energy_j" in mine else {})
    own = sum(j for name, j in by_device.items() if name != "cpu" or world.local_rank == 0)
    t = torch.tensor([own, 1.0 if by_device else 0.0], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total, known = t.tolist()
    return {"energy_j": total} if known == world.size else {}


def per_rank(sums, steps: int, world: World, dev: torch.device) -> list[dict] | None:
    """Each rank's own share of an epoch, for the straggler view: its seconds, images, input wait and
    mean step time (the step waits for the slowest rank's gradients)."""
    if not world.many:
        return None
    mine = torch.tensor([sums.seconds, float(sums.images), sums.data_wait_s], dtype=torch.float64, device=dev)
    got = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(got, mine)
    rows = []
    for rank, (seconds, images, wait) in enumerate(t.tolist() for t in got):
        rows.append({"rank": rank, "host": world.hosts[rank] if rank < len(world.hosts) else "",
                     "seconds": seconds, "images": int(images), "data_wait_s": wait,
                     "step_s": seconds / steps if steps > 0 else None})
    return rows


def hosts(world: World, dev: torch.device) -> tuple[str, ...]:
    """Every rank's host name (as bytes in a tensor: nothing pickled)."""
    if not world.many:
        return (world.host,)
    mine = torch.zeros(HOST_BYTES, dtype=torch.int64, device=dev)
    name = world.host.encode("utf-8")[:HOST_BYTES]
    mine[:len(name)] = torch.tensor(list(name), dtype=torch.int64)
    got = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(got, mine)
    return tuple(bytes(v for v in t.tolist() if v).decode("utf-8", "replace") for t in got)


def barrier(world: World) -> None:
    if world.many:
        dist.barrier()


def lost_contact(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another process died, hung past the timeout or
    could not be reached (PyTorch raises DistError subclasses; Gloo's transport errors arrive as
    RuntimeError with the peer's address in them)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(m in text for m in LOST_MESSAGES)


# What Gloo and NCCL say when a peer is gone or late ("Application timeout caused pair closure",
# "Connection reset by peer", "Timed out waiting ... for recv operation", "NCCL error ...").
LOST_MESSAGES = ("closed by peer", "reset by peer", "timed out", "timeout", "pair closure", "broken pipe",
                 "processgroupgloo", "processgroupnccl", "nccl error", "gloo/transport")


def lost_contact_line(world: World, timeout_s: float, e: BaseException) -> str:
    first = " ".join(str(e).split())[:200] or type(e).__name__
    return (f"rank {world.rank} on {world.host}: lost contact with the other processes of the run (another "
            f"rank died, or waited more than --dist-timeout {timeout_s:g}s): {first}")
