"""nnperf bench and the graph modes behind it (nnperf.train.jit): shared parameters, outputs equal
to eager's, deprecated and unavailable modes, the files written and the one-line errors."""

from __future__ import annotations

import copy
import csv
import json
from argparse import Namespace

import pytest
import torch
from torch import nn

from nnperf import device as devices
from nnperf.errors import UsageError
from nnperf.models import build
from nnperf.perf import bench
from nnperf.train import jit
from nnperf.train.step import TrainStep

FP32 = devices.Precision("fp32", "test")
# The smallest bench the CLI can ask for: MNIST-shaped batches of 4, a hundredth of a second per figure.
QUICK = ["--model", "convnet3", "--dataset", "mnist", "--batch-size", "4", "--min-time", "0.01", "--precision",
         "fp32", "--device", "cpu"]


def tiny(name: str = "convnet3", impl: str = "torch") -> nn.Module:
    torch.manual_seed(0)
    return build(name, 3, 10, 16, 4, impl)


def train_two_steps(model: nn.Module, forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Two of nnperf's training steps through `forward`, dropout masks drawn from a fixed seed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(model, optimizer, None, torch.device("cpu"), FP32, forward=forward)
    for seed in (1, 2):
        torch.manual_seed(seed)
        step(x, y)


def bench_namespace(**given) -> Namespace:
    flags = dict(model="convnet3", dataset="cifar10", batch_size=4, precision="fp32", channels_last=False,
                 device="cpu", modes="eager", what="forward,step", conv_impl="torch", min_time=0.01, out=None,
                 json=None, policy=False, width=4, image_size=16)
    return Namespace(**{**flags, **given})


@pytest.mark.parametrize("model_name", ["convnet3", "small_cifar"])  # dropout; BatchNorm
@pytest.mark.parametrize("mode", ["trace", "script", "export"])
def test_training_through_a_mode_updates_the_models_own_parameters_as_eager_does(mode, model_name):
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    model, reference = tiny(model_name), tiny(model_name)
    start = copy.deepcopy(model.state_dict())
    model.train(), reference.train()
    forward = jit.make_forward(model, mode, x, lambda m: None)
    train_two_steps(model, forward, x, y)
    train_two_steps(reference, reference, x, y)
    moved = max((model.state_dict()[k].float() - start[k].float()).abs().max().item() for k in start)
    assert moved > 1e-3  # the model's own parameters were trained
    state = model.state_dict()
    assert list(state) == list(reference.state_dict())  # a plain state dict, as eager's
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{mode}: {key}")


@pytest.mark.parametrize("mode", ["trace", "export"])
def test_graphs_made_on_one_batch_size_run_a_smaller_last_batch(mode):
    model = tiny("small_cifar").eval()
    forward = jit.make_forward(model, mode, torch.randn(4, 3, 16, 16), lambda m: None)
    last = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(forward(last), model(last))


class FixedBatch(nn.Module):
    """A model that only takes batches of 4 (its bias has one row per image)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 3)
        self.rows = nn.Parameter(torch.zeros(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) + self.rows


def test_export_of_a_model_that_fixes_its_batch_size_keeps_the_examples_shape():
    model, x = FixedBatch(), torch.randn(4, 3, 2, 2)
    forward = jit.make_forward(model, "export", x, lambda m: None)
    assert isinstance(forward, jit.ExampleShapeOnly)
    torch.testing.assert_close(forward(x), model(x))


def test_modes_are_named_deprecated_and_unknown_ones_refused():
    assert jit.canonical("none") == "eager" and jit.canonical(" Export ") == "export"
    assert jit.label("trace") == "trace (deprecated)" and jit.label("script") == "script (deprecated)"
    assert jit.label("export") == "export" and jit.DEPRECATED == {"trace", "script"}
    with pytest.raises(UsageError, match="--jit: unknown mode 'fx'"):
        jit.canonical("fx")


def test_a_model_script_cannot_take_is_unavailable_with_the_reason_every_time():
    model = tiny("convnet3", "handmade")  # HandmadeConv2d defines a function inside a method
    whys = []
    for _ in range(2):
        with pytest.raises(jit.ModeUnavailable) as caught:
            jit.make_forward(model, "script", torch.randn(4, 3, 16, 16), lambda m: None)
        whys.append(caught.value.why)
    assert whys[0] == whys[1] and "\n" not in whys[0] and "redefine" not in whys[0]


def test_deprecation_is_told_once_not_spammed(recwarn):
    said = []
    jit._told_deprecated.discard("trace")
    for _ in range(2):
        jit.make_forward(tiny(), "trace", torch.randn(2, 3, 16, 16), said.append)
    assert len(said) == 1 and "deprecated" in said[0]
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


def test_every_mode_gives_eagers_outputs_and_updates():
    plan = bench.plan_of(bench_namespace(modes="eager,trace,script,export"))
    rows = bench.bench_case(bench.make_case(plan, "convnet3", "torch"), lambda m: None)
    assert [(r.what, r.mode) for r in rows] == [(w, m) for w in ("forward", "step")
                                                for m in ("eager", "trace", "script", "export")]
    for r in rows:
        assert r.status == "ok" and r.check == "ok", r
        assert r.max_abs_diff < 1e-4 and r.median_s > 0 and r.setup_s > 0 and r.runs >= 1
        assert r.images_per_s == pytest.approx(4 / r.median_s)
        assert r.speedup == pytest.approx(rows[0 if r.what == "forward" else 4].median_s / r.median_s)
    assert all(r.diff_update is not None for r in rows if r.what == "step")


def test_a_wrong_graph_is_flagged_against_eager():
    row = bench.Row("m", "torch", "step", "compile", "compile", 4)
    ref = bench.Outcome(torch.tensor([2.0]), torch.tensor([0.5, -0.5]))
    bench.compare(row, bench.Outcome(torch.tensor([2.0]), torch.tensor([0.5, -0.5 + 1e-6])), ref, FP32)
    assert row.check == "ok"
    bench.compare(row, bench.Outcome(torch.tensor([2.0]), torch.tensor([0.5, 0.3])), ref, FP32)
    assert row.check == "MISMATCH" and row.max_abs_diff == pytest.approx(0.8)


def test_an_unavailable_mode_is_one_line_and_the_others_still_run(run_cli, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("scripting is switched off here\nsecond line")

    monkeypatch.setattr(torch.jit, "script", refuse)
    code, out, err = run_cli("bench", *QUICK, "--modes", "eager,script,trace", "--what", "forward", "--out", "o")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("convnet3")]
    assert len(lines) == 3
    assert "script (deprecated) unavailable: RuntimeError: scripting is switched off here" in lines[1]
    assert "second line" not in out
    assert "trace (deprecated)" in lines[2] and "ok" in lines[2]
    rows = json.loads(open("o/bench.json").read())["rows"]
    assert [r["status"] for r in rows] == ["ok", "unavailable", "ok"]


def test_cli_writes_csv_and_json_with_where_it_ran(run_cli, tmp_path):
    code, out, err = run_cli("bench", *QUICK, "--modes", "eager,trace", "--json", "extra.json")
    assert code == 0, err
    folder = tmp_path / "bench" / "convnet3"
    with open(folder / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["what"], r["mode"], r["label"]) for r in rows] == [
        ("forward", "eager", "eager"), ("forward", "trace", "trace (deprecated)"),
        ("step", "eager", "eager"), ("step", "trace", "trace (deprecated)")]
    assert all(float(r["median_s"]) > 0 and r["check"] == "ok" for r in rows)
    report = json.loads((folder / "bench.json").read_text())
    assert report == json.loads((tmp_path / "extra.json").read_text())
    assert report["tool"] == "nnperf bench" and report["plan"]["shape"] == [1, 28, 28]
    for key in ("device_name", "cpu", "torch", "cpu_threads", "precision"):
        assert report["env"][key] not in (None, "")
    assert "median ms" in out and "trace (deprecated)" in out
    # Its own files it replaces; anyone else's it refuses to, before measuring anything.
    assert run_cli("bench", *QUICK, "--modes", "eager", "--what", "forward")[0] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "bench.csv").write_text("my notes\n")
    code, out, err = run_cli("bench", *QUICK, "--out", "mine")
    assert code == 2 and "was not written by nnperf bench" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "bench.csv").read_text() == "my notes\n"
    assert not (tmp_path / "mine" / "bench.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "convnet3,vgg"], "--model: unknown value 'vgg'"),
    (["--modes", "eager,fx"], "--modes: unknown value 'fx'"),
    (["--what", "backward"], "--what: unknown value 'backward'"),
    (["--conv-impl", "fft"], "--conv-impl: unknown value 'fft'"),
    (["--batch-size", "0"], "--batch-size 0: must be between 1"),
    (["--min-time", "0"], "--min-time 0.0: must be above 0"),
    (["--min-time", "nan"], "--min-time nan: must be above 0"),
    (["--min-time", "100000"], "at most 600 seconds"),
    (["--dataset", "imagefolder"], "--dataset: bench knows the shapes of"),
    (["--policy", "--batch-size", "0"], "--batch-size 0: must be between 1"),
    (["--out", ""], "--out: must name a file or folder, not ''"),
    (["--json", ""], "--json: must name a file or folder, not ''"),
])
def test_bad_input_is_one_line(run_cli, flags, message):
    code, out, err = run_cli("bench", "--model", "convnet3", *flags)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compile_gives_eagers_outputs_and_updates(request):
    """torch.compile on a 2-core CPU takes 15 s to a minute (forward, backward, train and eval)."""
    # pyproject does not deselect slow tests by default: run this one only when -m names "slow"
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("torch.compile on a CPU: run with -m slow")
    plan = bench.plan_of(bench_namespace(modes="eager,compile"))
    rows = bench.bench_case(bench.make_case(plan, "convnet3", "torch"), lambda m: None)
    assert [r.status for r in rows] == ["ok"] * 4, rows
    assert all(r.check == "ok" and r.max_abs_diff < 1e-4 for r in rows), rows


def test_policy_prints_the_table_training_chooses_from_and_caches_it(run_cli, tmp_path):
    from nnperf.perf import policy

    code, out, err = run_cli("bench", "--policy", "--model", "convnet3", "--dataset", "mnist", "--batch-size", "8",
                             "--width", "4", "--image-size", "16", "--device", "cpu")
    assert code == 0, err
    table = out.split("chooses):\n")[1].splitlines()
    assert table[0].split()[:2] == ["candidate", "images/s"]
    rows = [line for line in table[1:] if line.strip()]
    assert len(rows) == len(policy.candidates(torch.device("cpu"), policy.devices.Precision("bf16", ""), None, None))
    assert sum("<- chosen" in line for line in rows) == 1  # conftest's timings: the rules' choice is fastest
    assert list((tmp_path / "cache" / "policy").glob("*.json"))
