"""FLOPs of a training step (FlopCounterMode), MFU and bytes per step: nnperf.perf.flops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnperf import models
from nnperf.perf import flops


def conv_flops(n: int, cin: int, cout: int, hw: int, k: int = 3) -> int:
    return 2 * n * cout * hw * hw * cin * k * k


def test_conv_counts_follow_the_formula():
    # First conv: its input needs no gradient, so backward computes only the weight gradient (1x
    # forward); the second conv computes the input gradient as well (2x forward).
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    count = flops.step_flops(model, (4, 3, 6, 6), num_classes=10)
    first, second = conv_flops(4, 3, 8, 6), conv_flops(4, 8, 16, 6)
    linear = 2 * 4 * 16 * 6 * 6 * 10
    assert count.by_module["0"] == {"forward": first, "backward": first}
    assert count.by_module["2"] == {"forward": second, "backward": 2 * second}
    assert count.by_module["4"] == {"forward": linear, "backward": 2 * linear}
    assert count.forward == first + second + linear
    assert count.backward == first + 2 * second + 2 * linear
    assert count.by_module[""] == {"forward": count.forward, "backward": count.backward}
    assert count.per_image == pytest.approx(count.total / 4)
    assert count.forward_per_image + count.backward_per_image == pytest.approx(count.per_image)


def test_linear_counts_and_frozen_layers():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    count = flops.step_flops(model, (8, 20))
    assert count.by_module["0"] == {"forward": 2 * 8 * 20 * 30, "backward": 2 * 8 * 20 * 30}
    assert count.by_module["2"] == {"forward": 2 * 8 * 30 * 5, "backward": 2 * 2 * 8 * 30 * 5}
    model[2].weight.requires_grad_(False)  # no weight gradient: backward is the input gradient only
    model[2].bias.requires_grad_(False)
    frozen = flops.step_flops(model, (8, 20))
    assert frozen.by_module["2"]["backward"] == 2 * 8 * 30 * 5


def _snapshot(model: nn.Module) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.grad for k, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    return {"state": state, "grads": grads, "modes": modes}


def _assert_untouched(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert all(g is None for g in after["grads"].values())
    assert after["modes"] == before["modes"]


@pytest.mark.parametrize("name", ["small_cifar", "convnet3", "fast"])
def test_counting_leaves_model_and_rng_untouched(name):
    torch.manual_seed(0)
    model = models.build(name, 3, 10, 16, 8).train()  # BatchNorm in training mode, dropout active
    before = _snapshot(model)
    rng = torch.get_rng_state()
    per_image = flops.model_flops_per_image(model, (3, 16, 16), num_classes=10)
    assert per_image > 0
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_untouched(model, before)
    assert flops.model_flops_per_image(model, (3, 16, 16), training=False) < per_image


class _PlainTensorAttribute(nn.Module):
    """A model whose forward uses a tensor that is no parameter or buffer: not runnable on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.scale = torch.full((1, 4, 1, 1), 2.0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn(self.conv(x)) * self.scale
        return self.fc(torch.nn.functional.dropout(x, 0.5, self.training).mean((2, 3)))


def test_fallback_on_a_cpu_copy_counts_the_same_and_touches_nothing():
    model = _PlainTensorAttribute().train()
    before = _snapshot(model)
    rng = torch.get_rng_state()
    count = flops.step_flops(model, (2, 3, 5, 5))
    assert count.forward == conv_flops(2, 3, 4, 5) + 2 * 2 * 4 * 3
    assert torch.equal(torch.get_rng_state(), rng)
    _assert_untouched(model, before)
    assert flops.activation_elements_per_image(model, (3, 5, 5)) == 4 * 25 * 2 + 3


def test_wrong_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        flops.step_flops(nn.Linear(4, 3), (2, 4), num_classes=10)


def test_mfu():
    assert flops.mfu(1e9, 1000.0, 1e13) == pytest.approx(0.1)
    assert 0 < flops.mfu(2e6, 5000.0, 80e9) < 1
    assert flops.mfu(1e9, 0.0, 1e13) == 0.0
    for bad in ((1e9, 1000.0, None), (1e9, 1000.0, 0.0), (None, 1000.0, 1e13), (1e9, math.nan, 1e13),
                (1e9, 1000.0, math.inf), (-1.0, 1000.0, 1e13)):
        assert flops.mfu(*bad) is None, bad


def test_bytes_per_step_adds_up():
    model = nn.Linear(10, 5)  # 55 fp32 parameters: W = 220 bytes
    sgd = flops.bytes_per_step(model, "sgd", batch=8, activation_elements=5)
    assert (sgd.param_bytes, sgd.grad_bytes, sgd.state_bytes) == (4 * 220, 2 * 220, 2 * 220)
    assert sgd.activation_bytes == 5 * 5 * 8 * 4
    assert sgd.total_bytes == sum(v for k, v in sgd.as_dict().items() if k != "total_bytes")
    assert flops.bytes_per_step(model, "adamw", 8, activation_elements=5).state_bytes == 4 * 220
    assert flops.bytes_per_step(model, 0, 8, activation_elements=5).state_bytes == 0
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    assert flops.activation_elements_per_image(conv, (3, 8, 8)) == 2 * 4 * 64
    half = flops.bytes_per_step(conv, "sgd", 2, image_shape=(3, 8, 8), activation_element_bytes=2)
    assert half.activation_bytes == 5 * 2 * 4 * 64 * 2 * 2
    with pytest.raises(ValueError, match="optimizer"):
        flops.bytes_per_step(model, "lion", 8, activation_elements=5)
    with pytest.raises(ValueError, match="image_shape"):
        flops.bytes_per_step(model, "sgd", 8)


def test_a_grouped_convolution_backward_costs_twice_its_forward():
    """PyTorch's formula counts a depthwise convolution's weight gradient as a full convolution
    (`groups` times too much); nnperf's counts each gradient at the forward's cost."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1, groups=64),
                          nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    count = flops.step_flops(model, (4, 3, 8, 8), 10)
    depthwise = 4 * 64 * 8 * 8 * 9 * 2
    by_module = count.by_module
    key = next(k for k in by_module if k.endswith("1"))
    assert by_module[key]["forward"] == depthwise
    assert by_module[key]["backward"] == 2 * depthwise
