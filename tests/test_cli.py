"""End to end through the `nnperf` command on tiny synthetic data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from nnperf import config as configs
from nnperf import device as devices
from nnperf.train.optim import OPTIMIZERS

from conftest import TINY


def _final(out: str) -> str:
    line = [l for l in out.splitlines() if l.startswith("FINAL")][-1]
    return line


def test_train_writes_the_whole_run_directory(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--name", "r", "--save-every", "1")
    assert code == 0, err
    run = tmp_path / "runs" / "r"
    lines = out.splitlines()
    best = devices.best_mixed(torch.device("cpu")).name  # the default precision policy's choice here
    assert lines[0].startswith(f"run {Path('runs') / 'r'}") and f"| {best} (" in lines[0]
    assert lines[1].startswith("e1: train ") and " img/s" in lines[1]
    assert lines[-1].startswith("FINAL top1 ")
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt",
                 "checkpoints/final_weights.pt", "checkpoints/epoch0001.pt", "checkpoints/epoch0002.pt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["name"] == "r" and config["width"] == 8
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["precision"] == best and env["data"]["eval_split"] == "test"
    assert env["channels_last"] == (best != "fp32") and env["channels_last_reason"]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert rows[0]["images"] == 192 and rows[1]["images"] == 48
    assert {"loss", "top1", "top5", "lr", "seconds", "images_per_s", "data_wait_s"} <= set(rows[0])
    assert rows[2]["loss"] < rows[0]["loss"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best", "config"} <= set(best)


def test_test_command_equals_final_and_predict_names_classes(run_cli, tmp_path):
    code, out, _ = run_cli("train", *TINY, "--epochs", "2", "--name", "r")
    assert code == 0
    final = _final(out)
    code, test_out, _ = run_cli("test", "runs/r")
    assert code == 0
    top1, top5, loss = (final.split("top1 ")[1].split(",")[0], final.split("top5 ")[1].split(",")[0],
                        final.split("loss ")[1].split(" ")[0])
    assert test_out.strip() == f"TEST top1={top1}  top5={top5}  loss={loss}"
    code, train_out, _ = run_cli("test", "runs/r", "--split", "train", "--checkpoint", "runs/r/checkpoints/last.pt")
    assert code == 0 and train_out.startswith("TEST top1=")
    kept = json.loads((tmp_path / "runs" / "r" / "test.json").read_text())
    assert set(kept) == {"val", "train"} or set(kept) == {"test", "train"}
    assert f"{next(v for k, v in kept.items() if k != 'train')['top1']:.3f}" == top1

    img = Image.new("RGB", (16, 16), (200, 30, 30))
    img.save(tmp_path / "a.png")
    code, out, _ = run_cli("predict", "runs/r/checkpoints/best.pt", "a.png", "--topk", "3", "--json")
    assert code == 0
    result = json.loads(out)
    assert result[0]["image"] == "a.png" and len(result[0]["top"]) == 3
    assert result[0]["top"][0]["class"].startswith("class")
    probs = [t["prob"] for t in result[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    code, text, _ = run_cli("predict", "runs/r/checkpoints/final_weights.pt", "a.png", "--topk", "2")
    assert code == 0 and text.splitlines()[0] == "a.png" and "%" in text.splitlines()[1]


def test_config_file_then_flags(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 5\nbatch-size: 64\noptimizer: adam\nlr: 0.01\n")
    code, _, err = run_cli("train", "--config", "c.yaml", *TINY, "--epochs", "1", "--name", "c")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "runs" / "c" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["optimizer"] == "adam" and saved["batch_size"] == 32


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_every_optimizer_learns(run_cli, tmp_path, opt):
    lr = {"adam": "0.003", "adamw": "0.003", "rmsprop": "0.001", "adagrad": "0.02"}.get(opt, "0.05")
    code, _, err = run_cli("train", *TINY, "--epochs", "3", "--optimizer", opt, "--lr", lr, "--name", opt,
                           "--schedule", "onecycle")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "runs" / opt / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]


def _weights(path):
    return torch.load(path, weights_only=True)


def _same_run(a: Path, b: Path):
    wa, wb = _weights(a / "checkpoints" / "final_weights.pt"), _weights(b / "checkpoints" / "final_weights.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    keys = ("epoch", "step", "phase", "loss", "top1", "top5", "lr", "images")
    ra = [{k: r.get(k) for k in keys} for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines())]
    rb = [{k: r.get(k) for k in keys} for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines())]
    assert ra == rb


# convnet3 has dropout, so these also check that the global RNG state is carried over.
RESUMABLE = [*TINY, "--model", "convnet3", "--log-every", "3"]
# The fast recipe's moving parts: whitening init, lookahead, decoupled SGD, alternating flips, TTA.
FAST_RECIPE = [*TINY, "--model", "fast", "--decoupled", "--lr", "5", "--weight-decay", "0.01", "--momentum",
               "0.85", "--norm-lr-scale", "16", "--label-smoothing", "0.2", "--schedule", "triangle",
               "--lookahead-every", "2", "--flip", "alternate", "--pad-mode", "reflect", "--crop-pad", "2",
               "--cutout", "4", "--tta", "2", "--eval-every", "3", "--log-every", "3"]


def test_resume_after_two_of_four_epochs_gives_the_same_run(run_cli, tmp_path):
    assert run_cli("train", *RESUMABLE, "--epochs", "4", "--name", "full")[0] == 0
    assert run_cli("train", *RESUMABLE, "--epochs", "4", "--name", "part", "--max-steps", "12")[0] == 0
    code, out, err = run_cli("train", "--resume", "runs/part/checkpoints/last.pt", "--max-steps", "0")
    assert code == 0, err
    assert out.splitlines()[1].startswith("e3:")
    _same_run(tmp_path / "runs" / "full", tmp_path / "runs" / "part")


@pytest.mark.parametrize("recipe", [RESUMABLE, FAST_RECIPE], ids=["convnet3", "fast"])
def test_signal_mid_epoch_saves_position_and_resume_reproduces(run_cli, tmp_path, monkeypatch, recipe):
    from nnperf.train import step as step_module

    real_step = step_module.TrainStep.__call__
    calls = {"n": 0}

    def step_then_signal(self, x, y):
        calls["n"] += 1
        if calls["n"] == 10:  # mid epoch 2 (6 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, x, y)

    assert run_cli("train", *recipe, "--epochs", "3", "--name", "full")[0] == 0
    monkeypatch.setattr(step_module.TrainStep, "__call__", step_then_signal)
    code, out, err = run_cli("train", *recipe, "--epochs", "3", "--name", "part")
    assert code == 128 + signal.SIGINT
    assert "nnperf train --resume runs/part/checkpoints/last.pt" in err and "Traceback" not in err
    state = torch.load(tmp_path / "runs/part/checkpoints/last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 4, 10)
    monkeypatch.setattr(step_module.TrainStep, "__call__", real_step)
    code, out, err = run_cli("train", "--resume", "runs/part/checkpoints/last.pt")
    assert code == 0, err
    _same_run(tmp_path / "runs" / "full", tmp_path / "runs" / "part")


def test_sigterm_to_the_process_then_resume(tmp_path):
    """The real command in its own process: SIGTERM, exit status, message, resume."""
    args = [sys.executable, "-m", "nnperf", "train", *TINY, "--epochs", "60", "--name", "p"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NNPERF_CACHE": str(tmp_path / "cache")})
    metrics = tmp_path / "runs" / "p" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume runs/p/checkpoints/last.pt" in err
    assert "Traceback" not in err
    state = torch.load(tmp_path / "runs/p/checkpoints/last.pt", weights_only=True)
    assert 0 < state["global_step"] < 60 * 6
    resumed = subprocess.run([sys.executable, "-m", "nnperf", "train", "--resume", "runs/p/checkpoints/last.pt",
                              "--epochs", str(state["epoch"] + 1)], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "NNPERF_CACHE": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[-1].startswith("FINAL ")


def test_model_help_lists_the_registry(run_cli):
    code, out, _ = run_cli("train", "--model", "help")
    assert code == 0
    for name in ("small_cifar", "convnet3", "resnet18", "resnet34"):
        assert name in out


def test_clear_telemetry_removes_old_telemetry_on_resume(run_cli, tmp_path):
    assert run_cli("train", *TINY, "--epochs", "1", "--name", "r")[0] == 0
    old = tmp_path / "runs" / "r" / "telemetry" / "train_epoch.jsonl"
    old.parent.mkdir(exist_ok=True)
    old.write_text("{}\n")
    code, _, err = run_cli("train", "--resume", "runs/r/checkpoints/last.pt", "--epochs", "2", "--clear-telemetry")
    assert code == 0, err
    rows = [json.loads(line) for line in old.read_text().splitlines()] if old.exists() else []
    assert {} not in rows and all(r["epoch"] == 2 for r in rows)  # only the resumed run's samples


def test_clear_perf_is_still_accepted_as_clear_telemetry(run_cli, tmp_path):
    from nnperf import cli

    for flag, value in (("--clear-perf", True), ("--no-clear-perf", False), ("--clear-telemetry", True)):
        assert cli._parser().parse_args(["train", flag]).clear_telemetry is value
    code, out, _ = run_cli("train", "--help")
    assert code == 0 and "--clear-telemetry" in out and "clear-perf" not in out  # the old name is not offered
    # config.yaml of runs from before the rename, used as a preset or rebuilt from the run directory.
    (tmp_path / "old.yaml").write_text("clear_perf: true\nepochs: 2\n")
    assert configs.load_yaml("old.yaml") == {"clear_telemetry": True, "epochs": 2}
    cfg = configs.build({"clear_perf": True, "dataset": "synthetic"}, {})
    assert cfg.clear_telemetry
    assert not configs.build({"clear_perf": True}, {"clear_telemetry": False}).clear_telemetry  # the override wins
    assert "clear_perf" not in configs.to_dict(cfg)  # new runs save the new name


def test_a_run_directory_from_before_the_rename_is_still_a_run(tmp_path):
    from nnperf.train.rundir import is_run_dir

    run = tmp_path / "runs" / "old"
    (run / "checkpoints").mkdir(parents=True)
    saved = {**configs.to_dict(configs.TrainConfig()), "name": "old"}
    saved["clear_perf"] = saved.pop("clear_telemetry")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert configs.build(saved, {}).name == "old"
    assert is_run_dir(run)


def test_val_split_is_evaluated_and_recorded(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--val-split", "40", "--name", "v")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "runs/v/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["images"] == 152 and rows[1]["images"] == 40
    final = _final(out)
    code, test_out, _ = run_cli("test", "runs/v")
    assert code == 0 and test_out.startswith(f"TEST top1={final.split('top1 ')[1].split(',')[0]}")


def test_fast_recipe_evaluates_with_tta_at_the_end(run_cli, tmp_path):
    code, out, err = run_cli("train", *FAST_RECIPE, "--epochs", "4", "--name", "f")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "runs/f/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["phase"] == "val"] == [3, 4]
    assert [r["step"] for r in rows if r["phase"] == "train_step"] == [3, 6, 9, 12, 15, 18, 21, 24]
    code, test_out, _ = run_cli("test", "runs/f")
    final = _final(out)
    assert test_out.startswith(f"TEST top1={final.split('top1 ')[1].split(',')[0]}")


def test_compile_failure_falls_back_to_eager(run_cli, tmp_path, monkeypatch):
    def broken_compile(model, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--compile", "--name", "c")
    assert code == 0, err
    lines = out.splitlines()
    assert any(l.startswith("--compile: torch.compile failed (RuntimeError: no C++ compiler found); running eager")
               for l in lines)
    assert lines[-1].startswith("FINAL")


def test_fast_training_leaves_the_whitening_filters_as_initialised(run_cli, tmp_path):
    from nnperf import config as configs
    from nnperf import models as registry
    from nnperf.train.build import load_splits
    from nnperf.data import DataInfo
    from nnperf.train.build import _init_from_data

    code, _, err = run_cli("train", *FAST_RECIPE, "--epochs", "4", "--optimizer", "muon", "--name", "w")
    assert code == 0, err
    state = torch.load(tmp_path / "runs/w/checkpoints/last.pt", weights_only=True)
    # The whitening is data-dependent: compare with a fresh initialisation on the same images.
    fresh = registry.build("fast", 3, 10, 16, width=8)
    splits = load_splits(configs.build({}, {"dataset": "synthetic", "synthetic_size": 192, "image_size": 16}))
    _init_from_data(fresh, splits.train, DataInfo.from_dict(state["data"]), torch.device("cpu"))
    torch.testing.assert_close(state["model"]["whiten.weight"], fresh.whiten.weight)
    assert not torch.equal(state["model"]["whiten.bias"], fresh.whiten.bias)  # the bias did learn
