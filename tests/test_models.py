import pytest
import torch
from torch import nn

from nnperf import models
from nnperf.models.handconv import HandmadeConv2d
from nnperf.models.layers import GlobalAvgPool


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("channels,size", [(3, 16), (1, 28)])
def test_every_model_trains_one_step(name, channels, size):
    torch.manual_seed(0)
    model = models.build(name, channels, 7, size, width=8)
    x = torch.randn(4, channels, size, size)
    y = torch.arange(4) % 7
    logits = model(x)
    assert logits.shape == (4, 7)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_convnet3_handmade_option_uses_handmade_conv():
    model = models.build("convnet3", 3, 10, 16, width=8, conv_impl="handmade")
    kinds = {type(m) for m in model.modules()}
    assert HandmadeConv2d in kinds and nn.Conv2d not in kinds
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 5), padding=(1, 2), bias=False),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=1),
])
def test_handmade_conv_matches_nn_conv2d(kw):
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 5, **kw).double()
    mine = HandmadeConv2d(3, 5, **kw).double()
    mine.load_state_dict(ref.state_dict())
    x1 = torch.randn(2, 3, 9, 11, dtype=torch.double, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out_ref, out_mine = ref(x1), mine(x2)
    assert out_mine.shape == out_ref.shape
    torch.testing.assert_close(out_mine, out_ref)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_mine.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    if ref.bias is not None:
        torch.testing.assert_close(mine.bias.grad, ref.bias.grad)


def test_handmade_conv_init_matches_nn_conv2d_distribution():
    torch.manual_seed(1)
    a = nn.Conv2d(16, 32, 3)
    torch.manual_seed(1)
    b = HandmadeConv2d(16, 32, 3)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


def test_resnet_has_cifar_stem():
    model = models.build("resnet18", 3, 10, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_fast_model_whitening_init_decorrelates_patches():
    torch.manual_seed(0)
    # Correlated channels and neighbouring pixels, as in real images.
    base = torch.randn(64, 1, 12, 12)
    images = torch.cat([base, 0.8 * base + 0.2 * torch.randn_like(base), torch.randn(64, 1, 12, 12)], 1)
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    model = models.build("fast", 3, 10, 12, width=8)
    model.init_from_data(images)
    with torch.no_grad():
        out = model.whiten(images) - model.whiten.bias.view(1, -1, 1, 1)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the other 12 filters are the negatives
    cov = half.T @ half / len(half)
    # Whitened up to the eps regulariser: variance eigenvalue/(eigenvalue + eps) per direction.
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eig = torch.linalg.eigvalsh(patches.T @ patches / len(patches))
    torch.testing.assert_close(cov, torch.diag(eig / (eig + 5e-4)), atol=2e-3, rtol=0)
    assert eig.max() / eig.min() > 100  # the input really was far from white
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    before = model.whiten.weight.clone()
    model.init_from_data(images)
    torch.testing.assert_close(model.whiten.weight, before)


def test_fast_model_matches_the_published_size_and_has_frozen_norm_scales():
    model = models.build("fast", 3, 10, 32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.97e6, rel=0.01)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and not any(m.weight.requires_grad for m in norms)
    # Dirac initialisation: the first conv of a group passes its input channels through.
    conv = model.layers[1].conv1
    assert conv.weight[3, 3, 1, 1] == 1 and conv.weight[3, 3].sum() == 1


def test_fast_model_keeps_its_whitening_filters_and_freezes_their_bias_later():
    model = models.build("fast", 3, 10, 16, width=8)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    model.on_epoch_start(2)
    assert model.whiten.bias.requires_grad
    model.on_epoch_start(3)
    assert not model.whiten.bias.requires_grad


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_global_avg_pool_matches_adaptive_pool_and_keeps_the_gradient_layout(memory_format):
    x = torch.randn(4, 6, 5, 5).contiguous(memory_format=memory_format).requires_grad_(True)
    out = GlobalAvgPool()(torch.relu(x))
    torch.testing.assert_close(out, torch.nn.functional.adaptive_avg_pool2d(torch.relu(x), 1).flatten(1))
    grads = []
    relu_out = torch.relu(x)
    relu_out.register_hook(lambda g: grads.append(g))
    GlobalAvgPool()(relu_out).sum().backward()
    assert grads[0].is_contiguous(memory_format=memory_format)


def test_small_and_resnet_models_pool_with_the_layout_keeping_pool():
    for name in ("small_cifar", "resnet18"):
        assert any(isinstance(m, GlobalAvgPool) for m in models.build(name, 3, 10, 32).modules())


def test_handmade_conv_runs_in_channels_last_and_matches_conv2d():
    # GPUs default to channels_last: the handmade conv's weight then is not viewable as (O, C*kh*kw).
    torch.manual_seed(0)
    mine = HandmadeConv2d(3, 5, kernel_size=3, padding=1).double().to(memory_format=torch.channels_last)
    assert not mine.weight.is_contiguous()
    x = torch.randn(2, 3, 9, 11, dtype=torch.double).to(memory_format=torch.channels_last).requires_grad_(True)
    out = mine(x)
    ref = nn.functional.conv2d(x, mine.weight, mine.bias, padding=1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, mine.weight, mine.bias), g)
    rx, rw, rb = torch.autograd.grad(ref, (x, mine.weight, mine.bias), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)


def test_convnet3_handmade_trains_one_step_in_channels_last():
    torch.manual_seed(0)
    model = models.build("convnet3", 3, 10, 16, width=8, conv_impl="handmade").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    logits = model(x)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
