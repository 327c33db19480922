import pytest
import torch
from torch import nn

from nnperf import config
from nnperf.train.optim import (OPTIMIZERS, SAM, SAM_BASES, Lookahead, Schedule, decoupled_sgd, make_optimizer,
                                 param_groups)


def test_schedules_have_their_shapes():
    cos = Schedule("cosine", total=100, warmup=10)
    assert [round(cos(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert cos(10) == 1.0 and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    step = Schedule("step", total=100, warmup=0)
    assert (step(10), step(60), step(90)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    one = Schedule("onecycle", total=100, warmup=0)
    assert one(0) == pytest.approx(1 / 25) and one(25) == pytest.approx(1.0) and one(100) == pytest.approx(0.0)
    assert max(one(s) for s in range(100)) == pytest.approx(1.0)
    assert Schedule("constant", total=100, warmup=0)(77) == 1.0
    tri = Schedule("triangle", total=100, warmup=0)
    assert tri(0) == pytest.approx(0.2) and tri(23) == pytest.approx(1.0) and tri(100) == pytest.approx(0.07)


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    weights, biases, norms = param_groups(model, 5e-4, norm_lr_scale=8)
    assert weights["weight_decay"] == 5e-4 and {p.ndim for p in weights["params"]} == {2, 4}
    assert biases["weight_decay"] == 0 and len(biases["params"]) == 2
    assert norms["weight_decay"] == 0 and len(norms["params"]) == 2 and norms["lr_scale"] == 8
    everything = param_groups(model, 5e-4, norm_lr_scale=8, decay_all=True)
    assert everything[1]["weight_decay"] == 5e-4 and everything[2]["weight_decay"] == 5e-4 / 8


def test_decoupled_form_matches_airbench_numbers():
    # airbench94: lr 11.5, wd 0.0153, momentum 0.85, batch 1024 -> per-sum lr 0.001465, decay 0.001995.
    lr, wd = decoupled_sgd(11.5, 0.0153, 0.85, 1024)
    assert lr / 1024 == pytest.approx(11.5 / (1024 * (1 + 1 / 0.15)))
    assert lr * wd == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)))


def test_lookahead_pulls_weights_to_their_average():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    la = Lookahead(model, every=1, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.update(model, progress=1.0)
    assert model.weight.flatten().tolist() == [0.5, 0.5]
    with torch.no_grad():
        model.weight.fill_(3.0)
    la.update(model, progress=0.0)  # at the start: no averaging, the average jumps to the weights
    assert model.weight.flatten().tolist() == [3.0, 3.0]
    with torch.no_grad():
        model.weight.fill_(5.0)
    la.finish(model)
    assert model.weight.flatten().tolist() == [3.0, 3.0]


def _quadratic_model():
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def test_sam_step_uses_the_gradient_at_the_perturbed_point():
    model = _quadratic_model()
    cfg = config.build({}, {"optimizer": "sam", "sam_base": "sgd", "momentum": 0.0, "weight_decay": 0.0,
                            "lr": 0.1, "sam_rho": 0.5})
    opt = make_optimizer(cfg, model)
    x = torch.randn(8, 4)

    def loss_fn():
        return (model(x) ** 4).mean()

    w0 = [p.detach().clone() for p in model.parameters()]
    loss_fn().backward()
    g = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in g]))
    with torch.no_grad():  # the SAM update computed by hand
        for p, gi in zip(model.parameters(), g):
            p.add_(gi * 0.5 / norm)
    model.zero_grad()
    loss_fn().backward()
    g_adv = [p.grad.clone() for p in model.parameters()]
    expected = [w - 0.1 * ga for w, ga in zip(w0, g_adv)]
    with torch.no_grad():
        for p, w in zip(model.parameters(), w0):
            p.copy_(w)
    model.zero_grad()
    loss_fn().backward()
    opt.step(lambda: loss_fn().backward())
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    assert not any("e_w" in opt.state[p] for p in model.parameters())


def test_sam_state_dict_carries_the_base_momentum():
    model = _quadratic_model()
    cfg = config.build({}, {"optimizer": "sam", "sam_base": "nesterov"})
    opt = make_optimizer(cfg, model)
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()
    opt.step(lambda: model(x).pow(2).mean().backward())
    state = opt.state_dict()
    assert any("momentum_buffer" in s for s in state["state"].values())
    other = make_optimizer(cfg, _quadratic_model())
    other.load_state_dict(state)
    assert isinstance(other, SAM) and other.param_groups is other.base.param_groups


def test_orthogonalise_flattens_the_singular_values():
    from nnperf.train.optim import orthogonalise
    torch.manual_seed(0)
    g = torch.randn(16, 40) @ torch.diag(torch.logspace(-2, 1, 40))
    sv = torch.linalg.svdvals(orthogonalise(g, steps=5).float())
    assert sv.min() > 0.5 and sv.max() < 1.3  # from a spread of 1000x to within [0.5, 1.3]
    u, _, v = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(orthogonalise(g, steps=5).float().flatten(), (u @ v).flatten(), 0)
    assert cos > 0.95


def test_muon_updates_filters_orthogonally_and_the_rest_by_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    cfg = config.build({}, {"optimizer": "muon", "lr": 0.1, "momentum": 0.9, "muon_lr": 0.05})
    opt = make_optimizer(cfg, model)
    muon_groups = [g for g in opt.param_groups if g["muon"]]
    assert len(muon_groups) == 1 and muon_groups[0]["params"] == [model[0].weight]
    conv = model[0].weight.detach().clone()
    head = model[3].weight.detach().clone()
    x = torch.randn(4, 3, 6, 6)
    model(x).pow(2).mean().backward()
    grad = model[3].weight.grad.clone()
    opt.step()
    # Nesterov SGD on the head: p - lr * (g + m * (m*0 + g)).
    torch.testing.assert_close(model[3].weight.detach(), head - 0.1 * (grad + 0.9 * grad))
    # Filters: rescaled to norm sqrt(out channels), then a step of lr along an orthogonal matrix.
    rescaled = conv * 8 ** 0.5 / conv.norm()
    step = ((rescaled - model[0].weight.detach()) / 0.05).reshape(8, -1)
    sv = torch.linalg.svdvals(step)
    assert sv.min() > 0.5 and sv.max() < 1.3


def test_the_registry_and_the_config_list_the_same_optimizers():
    # config.py names them for --help and validation without importing torch; optim.py builds them.
    assert tuple(OPTIMIZERS) == config.OPTIMIZERS
    assert tuple(SAM_BASES) == config.SAM_BASES


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    opt = make_optimizer(config.build({}, {"optimizer": name, "lr": 0.01}), model)
    x = torch.randn(4, 3, 6, 6)
    before = [p.detach().clone() for p in model.parameters()]
    loss = lambda: model(x).pow(2).mean().backward()  # noqa: E731
    loss()
    opt.step(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("base", list(SAM_BASES))
def test_sam_wraps_every_base(base):
    opt = make_optimizer(config.build({}, {"optimizer": "sam", "sam_base": base, "lr": 0.01}), _quadratic_model())
    assert isinstance(opt, SAM) and type(opt.base) is SAM_BASES[base](config.TrainConfig())[0]
