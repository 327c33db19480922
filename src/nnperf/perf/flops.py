"""FLOPs of a training step (torch.utils.flop_counter.FlopCounterMode), MFU, and bytes moved per step.

Counting runs the model on the meta device through torch.func.functional_call with stand-in
parameters and buffers: no arithmetic is done, no memory is used on the model's device, and the
model's parameters, gradients, BatchNorm running statistics and the RNG state stay as they were.
A model whose forward does not run on meta (a tensor kept as a plain attribute, an op without a
meta kernel) is counted on a CPU copy instead, under a forked RNG.

FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-add), not the
elementwise work (activations, normalisation, the optimizer): the usual convention for MFU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

# Tensors of state per parameter that each optimizer keeps (momentum, moments, sums of squares).
# SAM keeps its base's state and one more (the perturbation), and runs forward+backward twice per
# step: callers counting SAM's FLOPs double step_flops.
OPTIMIZER_STATES = {"sgd": 1, "nesterov": 1, "adam": 2, "adamw": 2, "rmsprop": 1, "adagrad": 1, "muon": 1,
                    "sam": 2}


@dataclass
class FlopCount:
    """FLOPs of one forward and one backward pass over a batch; by module path ("" is the whole
    model), each {"forward": n, "backward": n}."""

    batch: int
    forward: int
    backward: int
    by_module: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def per_image(self) -> float:
        """Forward + backward FLOPs per image: what a training step costs per image."""
        return self.total / self.batch

    @property
    def forward_per_image(self) -> float:
        return self.forward / self.batch

    @property
    def backward_per_image(self) -> float:
        return self.backward / self.batch

    def as_dict(self) -> dict:
        return {"batch": self.batch, "forward_flops": self.forward, "backward_flops": self.backward,
                "flops_per_image": self.per_image, "forward_flops_per_image": self.forward_per_image,
                "backward_flops_per_image": self.backward_per_image, "by_module": self.by_module}


def _unwrap(model: nn.Module) -> nn.Module:
    """The module behind torch.compile's OptimizedModule and DistributedDataParallel's wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None)
                                                      if type(model).__name__.endswith("DataParallel") else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Stand-ins on the meta device for every parameter (keeping requires_grad: a frozen layer has no
    weight gradient to count) and buffer."""
    state = {name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
             for name, p in model.named_parameters()}
    state.update({name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()})
    return state


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: the input gradient and the weight gradient each cost what the forward
    did. PyTorch's own formula counts the weight gradient as if the convolution were not grouped, so
    a depthwise convolution's backward came out `groups` times too large (EfficientNet-Lite0's step:
    2.6 GFLOP per 64x64 image instead of 0.19)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _count(model: nn.Module, state: dict | None, x: torch.Tensor, num_classes: int | None):
    """(forward counts, forward+backward counts) by module, from FlopCounterMode."""
    grouped_right = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=grouped_right) as counter:
        out = functional_call(model, state, (x,)) if state is not None else model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if num_classes is not None and out.shape[-1] != num_classes:
            raise ValueError(f"the model gives {out.shape[-1]} outputs per image, not num_classes={num_classes}")
        labels = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)  # which class costs nothing
        loss = F.cross_entropy(out.float(), labels)
        forward = counter.get_flop_counts()
        if loss.requires_grad:
            loss.backward()
        both = counter.get_flop_counts()
    return forward, both


def _on_cpu_copy(model: nn.Module, input_shape: tuple[int, ...], num_classes: int | None):
    clone = copy.deepcopy(model).to("cpu")
    with torch.random.fork_rng(devices=[]):
        return _count(clone, None, torch.zeros(input_shape), num_classes)


def _module_sums(counts: dict, root: str) -> dict[str, int]:
    """FLOPs per module path, without the root class's name ("ResNet.layer1" -> "layer1")."""
    out = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        path = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        out[path] = int(sum(ops.values()))
    return out


def step_flops(model: nn.Module, input_shape: tuple[int, ...], num_classes: int | None = None) -> FlopCount:
    """FLOPs of one training step's forward and backward (cross-entropy loss) over a batch of
    `input_shape` (N, C, H, W), by module. `num_classes` defaults to the model's output width.
    The model is left exactly as it was (see the module docstring)."""
    model = _unwrap(model)
    shape = tuple(int(s) for s in input_shape)
    try:
        forward, both = _count(model, _meta_state(model), torch.empty(shape, device="meta"), num_classes)
    except (RuntimeError, NotImplementedError, TypeError):
        forward, both = _on_cpu_copy(model, shape, num_classes)
    root = type(model).__name__
    fwd, total = _module_sums(forward, root), _module_sums(both, root)
    fwd_all = int(sum(forward.get("Global", {}).values()))
    all_ = int(sum(both.get("Global", {}).values()))
    by_module = {path: {"forward": fwd.get(path, 0), "backward": n - fwd.get(path, 0)} for path, n in total.items()}
    return FlopCount(batch=shape[0], forward=fwd_all, backward=all_ - fwd_all, by_module=by_module)


def model_flops_per_image(model: nn.Module, image_shape: tuple[int, ...], num_classes: int | None = None,
                          training: bool = True, batch: int = 2) -> float:
    """FLOPs per image of a training step (forward + backward), or of the forward alone with
    training=False, for images of `image_shape` (C, H, W). Counted once on stand-ins: the model's
    parameters, BN statistics and the RNG state are untouched."""
    count = step_flops(model, (batch, *image_shape), num_classes)
    return count.per_image if training else count.forward_per_image


def mfu(flops_per_image: float | None, images_per_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s. None where an input is unknown or
    not a finite non-negative number (and where the peak is not positive). Not clamped: above 1 means
    the peak it is compared with was measured low."""
    values = (flops_per_image, images_per_s, peak_flops)
    if any(v is None or not math.isfinite(v) or v < 0 for v in values) or peak_flops <= 0:
        return None
    return flops_per_image * images_per_s / peak_flops


def activation_elements_per_image(model: nn.Module, image_shape: tuple[int, ...], batch: int = 2) -> float:
    """Elements of the outputs of the model's leaf modules per image (on meta stand-ins): the
    activations a training step writes, and keeps for the backward pass."""
    return sum(leaf_output_elements(model, image_shape, batch).values())


def leaf_output_elements(model: nn.Module, image_shape: tuple[int, ...], batch: int = 2) -> dict[str, float]:
    """Elements of each leaf module's outputs per image, by module path: on meta stand-ins, or on a
    CPU copy (same paths) where the forward does not run on meta."""
    model = _unwrap(model)
    shape = (batch, *image_shape)
    try:
        totals = _hooked_outputs(model, lambda: functional_call(model, _meta_state(model),
                                                                (torch.empty(shape, device="meta"),)))
    except (RuntimeError, NotImplementedError, TypeError):
        clone = copy.deepcopy(model).to("cpu")
        with torch.random.fork_rng(devices=[]):
            totals = _hooked_outputs(clone, lambda: clone(torch.zeros(shape)))
    return {path: n / batch for path, n in totals.items()}


def _hooked_outputs(model: nn.Module, forward) -> dict[str, int]:
    """Output elements of each leaf module of `model` while `forward()` runs (a leaf called twice
    counts twice: it writes twice)."""
    paths = {id(m): path for path, m in model.named_modules()}
    totals: dict[str, int] = {}

    def add(module, _inputs, output) -> None:
        n = sum(t.numel() for t in (output if isinstance(output, (tuple, list)) else (output,))
                if isinstance(t, torch.Tensor))
        totals[paths[id(module)]] = totals.get(paths[id(module)], 0) + n

    _run_hooked(model, add, forward)
    return totals


def _run_hooked(model: nn.Module, hook, forward) -> None:
    """Run `forward()` without gradients with `hook` on every leaf module of `model`."""
    hooks = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()


@dataclass
class StepBytes:
    """Bytes one training step moves to and from device memory, by what they belong to."""

    param_bytes: int       # weights read in forward and backward, read and written by the optimizer
    grad_bytes: int        # gradients written in backward, read by the optimizer
    state_bytes: int       # optimizer state read and written
    activation_bytes: int  # activations and their gradients

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.state_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        return {"param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes, "state_bytes": self.state_bytes,
                "activation_bytes": self.activation_bytes, "total_bytes": self.total_bytes}


def optimizer_states(optimizer: str | int) -> int:
    """State tensors per parameter of an optimizer given by name (OPTIMIZER_STATES) or as a count."""
    if isinstance(optimizer, int) and not isinstance(optimizer, bool) and optimizer >= 0:
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZER_STATES:
        return OPTIMIZER_STATES[optimizer.lower()]
    raise ValueError(f"optimizer {optimizer!r}: give one of {', '.join(OPTIMIZER_STATES)} or a state count >= 0")


def bytes_per_step(model: nn.Module, optimizer: str | int, batch: int,
                   activation_elements: float | None = None, image_shape: tuple[int, ...] | None = None,
                   activation_element_bytes: int = 4) -> StepBytes:
    """An estimate of the bytes a training step moves through device memory (for the roofline),
    assuming nothing stays in cache between kernels:

    - weights (W bytes, the trainable parameters in their own dtypes): read in forward, read again in
      backward for the input gradients, read and written by the optimizer: 4 W;
    - gradients (as large as the weights): written in backward, read by the optimizer: 2 W;
    - optimizer state (k tensors the size of the weights, OPTIMIZER_STATES): read and written: 2 k W;
    - activations (A bytes: the outputs of the leaf modules, `activation_elements` per image, else
      counted for `image_shape` with activation_elements_per_image, times `batch` and
      `activation_element_bytes`, 2 under fp16/bf16 autocast): written and read once in forward,
      read again in backward, their gradients written and read in backward: 5 A.

    In-place layers (ReLU(inplace=True)) are counted as if they wrote a new tensor, and fused
    kernels move less: treat the figure as an upper estimate of the traffic."""
    weight = _weight_bytes(_unwrap(model))
    if activation_elements is None:
        if image_shape is None:
            raise ValueError("bytes_per_step needs activation_elements or image_shape")
        activation_elements = activation_elements_per_image(model, image_shape)
    activations = int(activation_elements * batch * activation_element_bytes)
    return StepBytes(param_bytes=4 * weight, grad_bytes=2 * weight,
                     state_bytes=2 * optimizer_states(optimizer) * weight, activation_bytes=5 * activations)


def _weight_bytes(module: nn.Module) -> int:
    """Bytes of the trainable parameters (a frozen one has no gradient or optimizer state to move)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def module_bytes_per_step(model: nn.Module, optimizer: str | int, batch: int, image_shape: tuple[int, ...],
                          activation_element_bytes: int = 4, names: list[str] | None = None) -> dict[str, int]:
    """bytes_per_step's estimate for each module in `names` (default: the model's direct children),
    by name: the module's own weights, gradients and optimizer state, and the outputs of the leaf
    modules inside it (and their gradients) at `batch`. Traffic of the root module's own ops and
    parameters is in no child."""
    model = _unwrap(model)
    leaves = leaf_output_elements(model, image_shape)
    states = optimizer_states(optimizer)
    modules = dict(model.named_modules())
    out = {}
    for name, child in ((n, modules[n]) for n in names if n in modules) if names is not None \
            else model.named_children():
        elements = sum(n for path, n in leaves.items() if path == name or path.startswith(name + "."))
        weight = _weight_bytes(child)
        # As in bytes_per_step: weights 4 W, gradients 2 W, state 2 k W, activations 5 A.
        out[name] = (6 + 2 * states) * weight + 5 * int(elements * batch * activation_element_bytes)
    return out
