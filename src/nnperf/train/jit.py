"""The model's forward pass through one of PyTorch's graph modes: eager, torch.compile,
torch.jit.trace, torch.jit.script or torch.export.

Every mode shares the model's parameters and buffers (checked): training through the returned
module updates `model` itself, so `model.state_dict()` stays a plain state dict and a checkpoint is
the same whichever mode ran.

Train or eval mode. trace and export record the mode the model is in when they run (BatchNorm's
batch statistics or running averages, dropout on or off), and export's module refuses .train() and
.eval(). So make the forward with the model in the mode it will run in: train mode for the training
step, eval mode for inference (evaluate with the eager model). compile and script follow the
model's mode at each call.

A smaller last batch. trace records sizes as operations, so any batch size runs; export is made
with a dynamic batch dimension, and where the model fixes its batch size export falls back to a
graph of the example's shape that hands any other batch shape to the eager model
(`ExampleShapeOnly`). compile recompiles once for the new size (then with a dynamic batch size);
script has no shapes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import UsageError
from .step import OUT_OF_MEMORY, CompiledOrEager

JIT_MODES = ("eager", "compile", "trace", "script", "export")
ALIASES = {"none": "eager"}
# TorchScript (trace and script) is deprecated in current PyTorch in favour of compile and export.
DEPRECATED = frozenset({"trace", "script"})

_told_deprecated: set[str] = set()  # one message per process, not one per model or call
# Why script refused a model class: a failed script leaves the class half compiled, and scripting
# it again fails with "Can't redefine method", which says nothing of the cause.
_script_refused: dict[frozenset, str] = {}  # by the classes the model is made of


class ModeUnavailable(Exception):
    """This mode cannot run this model here; `why` is one line."""

    def __init__(self, mode: str, why: str):
        super().__init__(f"{mode}: {why}")
        self.mode, self.why = mode, why


def canonical(mode: str, flag: str = "--jit") -> str:
    """The mode's name in JIT_MODES ("none" is eager); a UsageError naming `flag` for an unknown one."""
    name = ALIASES.get(mode.strip().lower(), mode.strip().lower())
    if name not in JIT_MODES:
        raise UsageError(f"{flag}: unknown mode '{mode}' (choose from {', '.join(JIT_MODES)})")
    return name


def label(mode: str) -> str:
    """The mode as tables show it: deprecated modes say so."""
    return f"{mode} (deprecated)" if mode in DEPRECATED else mode


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_deprecation():
    """TorchScript warns on every trace and on each scripted submodule: DEPRECATED marks it instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*(deprecated|not supported)", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """trace runs the model on the example: in train mode that would move BatchNorm's running
    statistics by one batch no training step saw. Put back in place (the graph shares them)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class ExampleShapeOnly(nn.Module):
    """A graph fixed to one input shape; other shapes (a smaller last batch) run the eager model."""

    def __init__(self, graph: nn.Module, model: nn.Module, shape: torch.Size):
        super().__init__()
        self.graph, self.eager, self.shape = graph, model, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x) if x.shape == self.shape else self.eager(x)


def _trace(model: nn.Module, x: torch.Tensor) -> nn.Module:
    # check_trace would run the model again and compare: with dropout on, two runs always differ.
    return torch.jit.trace(model, x, check_trace=False)


def _script(model: nn.Module, x: torch.Tensor) -> nn.Module:
    try:
        return torch.jit.script(model)
    except OUT_OF_MEMORY:
        raise
    except Exception as e:  # noqa: BLE001 - remembered per class, then raised
        kinds = frozenset(type(m) for m in model.modules())
        why = _script_refused.setdefault(kinds, first_line(e))
        raise ModeUnavailable("script", why) from None


def _export(model: nn.Module, x: torch.Tensor) -> nn.Module:
    # Copies of the example: a failed export leaves its dynamic-dimension marks on the tensor it
    # was given, and the static export would then fail as well.
    try:
        batch = torch.export.Dim.DYNAMIC
        return torch.export.export(model, (x.clone(),), dynamic_shapes=({0: batch},)).module()
    except OUT_OF_MEMORY:
        raise
    except Exception:  # noqa: BLE001 - e.g. a model that fixes its batch size: the example's shape only
        return ExampleShapeOnly(torch.export.export(model, (x.clone(),)).module(), model, x.shape)


BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
    "trace": _trace, "script": _script, "export": _export}


def _tensor_ids(module: nn.Module) -> set[int]:
    return {t.data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def _check_shared(model: nn.Module, forward: nn.Module, mode: str) -> None:
    """Training through `forward` must update `model`'s own tensors, or checkpoints would miss it."""
    own = _tensor_ids(model)
    params = {p.data_ptr() for p in model.parameters() if p.numel()}
    theirs = _tensor_ids(forward)
    if not params <= theirs or not theirs <= own:
        raise ModeUnavailable(mode, "the graph holds copies of the model's parameters instead of sharing them")


def make_forward(model: nn.Module, mode: str, example_input: torch.Tensor, log: Callable[[str], None]) -> nn.Module:
    """A module computing model(x) through `mode`, sharing `model`'s parameters and buffers; made
    with the model in the mode (train/eval) it will run in (see the module's docstring). compile
    falls back to eager with one message through `log` (as `nnperf train --compile`); trace, script
    and export raise ModeUnavailable with one line of why when they cannot take the model."""
    mode = canonical(mode)
    if mode == "eager":
        return model
    if mode == "compile":
        return CompiledOrEager(model, log)
    if mode in DEPRECATED and mode not in _told_deprecated:
        _told_deprecated.add(mode)
        log(f"{mode}: torch.jit.{mode} is deprecated in PyTorch {torch.__version__}; compile or export replace it")
    try:
        with _quiet_deprecation(), _buffers_kept(model):
            forward = BUILDERS[mode](model, example_input)
    except (ModeUnavailable, *OUT_OF_MEMORY):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build the graph means the mode is unavailable
        raise ModeUnavailable(mode, first_line(e)) from None
    _check_shared(model, forward, mode)
    return forward
