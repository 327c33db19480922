"""--time-budget: the epochs chosen from the measured step time, a probe that leaves no trace, bad budgets."""

from __future__ import annotations

import pytest
import torch
import yaml

from nnperf import config
from nnperf.train import budget

from conftest import TINY


def test_duration_reads_seconds_minutes_hours_and_numbers():
    assert [config.duration(v) for v in ("600", "600s", "10m", "1.5h", 90, 2.5)] == [600, 600, 600, 5400, 90, 2.5]
    for bad in ("10x", "m", "", "ten minutes", True):
        with pytest.raises(ValueError):
            config.duration(bad)


def test_epochs_within_fills_the_budget_with_training_and_evaluations():
    # 1000 s less the margin (30 s) less 70 s spent leaves 900 s: 9 epochs of 90 s + 10 s evaluation.
    assert budget.epochs_within(1000, 70, 90, 10, 1) == 9
    # Evaluating every 3 epochs (and after the last): 11 epochs need 880 + 40 s, 10 need 800 + 40 s.
    assert budget.epochs_within(1000, 70, 80, 10, 3) == 10  # 10 * 80 + 4 evaluations * 10 = 840
    assert budget.epochs_within(1000, 970, 90, 10, 1) == 0  # nothing left
    assert budget.epochs_within(100, 10, 50, 50, 1) == 0  # one epoch with its evaluation does not fit
    assert budget.evaluations(10, 3) == 4 and budget.evaluations(9, 3) == 3 and budget.evaluations(1, 5) == 1


def test_format_s_reads_like_a_person_writes_it():
    assert [budget.format_s(s) for s in (9.5, 42, 75, 600, 5400, 3600)] == ["9.5s", "42s", "1m15s", "10m", "1h30m",
                                                                           "1h"]


def _fake_clock(monkeypatch, step_s: float, eval_batch_s: float) -> list:
    """The probe really trains and evaluates (once each), but reports these times."""
    calls = []

    def timed(dev, call):
        call()
        calls.append(call)
        return (step_s if len(calls) == 1 else eval_batch_s), 1

    monkeypatch.setattr(budget, "_timed", timed)
    return calls


def test_budget_picks_the_epochs_that_fit_and_the_run_equals_one_given_those_epochs(run_cli, tmp_path, monkeypatch):
    calls = _fake_clock(monkeypatch, step_s=20.0, eval_batch_s=0.0)  # 6 steps of 20 s: 120 s an epoch
    code, out, err = run_cli("train", *TINY, "--time-budget", "400s", "--name", "budget", "--no-telemetry")
    assert code == 0, err
    assert len(calls) == 2
    assert "--time-budget 6m40s: a training step takes 20000.0 ms" in out and "chose 3 epochs" in out
    saved = yaml.safe_load((tmp_path / "runs/budget/config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["time_budget"] == 400
    assert "e3:" in out and "e4:" not in out
    code, out, err = run_cli("train", *TINY, "--epochs", "3", "--name", "plain", "--no-telemetry")
    assert code == 0, err
    a = torch.load(tmp_path / "runs/budget/checkpoints/final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/plain/checkpoints/final_weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the probe left no trace


def test_a_budget_too_short_for_one_epoch_says_how_long_one_takes(run_cli, tmp_path, monkeypatch):
    _fake_clock(monkeypatch, step_s=100.0, eval_batch_s=1.0)
    code, out, err = run_cli("train", *TINY, "--time-budget", "5m", "--name", "short", "--no-telemetry")
    assert code == 2
    assert "--time-budget 5m: too short for one epoch here: an epoch takes about 10m to train" in err
    assert "Traceback" not in err and not (tmp_path / "runs/short").exists()


@pytest.mark.parametrize("value, says", [("10x", "invalid duration value"), ("-5m", "must be above 0"),
                                         ("0", "must be above 0"), ("inf", "finite")])
def test_bad_budgets_are_one_line(run_cli, value, says):
    code, out, err = run_cli("train", *TINY, f"--time-budget={value}")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_a_resumed_run_keeps_the_epochs_its_budget_chose(run_cli, tmp_path, monkeypatch):
    _fake_clock(monkeypatch, step_s=20.0, eval_batch_s=0.0)
    code, out, err = run_cli("train", *TINY, "--time-budget", "400s", "--name", "r", "--no-telemetry",
                             "--max-steps", "6")
    assert code == 0, err
    code, out, err = run_cli("train", "--resume", tmp_path / "runs/r/checkpoints/last.pt")
    assert code == 0, err
    assert "keeps its 3 epochs" in out and "e3:" in out and "e4:" not in out


def test_keep_within_shortens_the_run_when_epochs_take_longer_than_probed(monkeypatch):
    from types import SimpleNamespace

    schedule = SimpleNamespace(total=100)
    run = SimpleNamespace(budget_clock=(0.0, 10.0), pos=SimpleNamespace(epoch=2, step=0),
                          cfg=SimpleNamespace(epochs=10, time_budget=100.0), train=[None] * 10,
                          scheduler=SimpleNamespace(lr_lambdas=[schedule]))
    monkeypatch.setattr(budget.time, "monotonic", lambda: 40.0)  # 2 epochs in 30 s: 15 s each
    said = []
    budget.keep_within(run, said.append)
    # 97 s usable (3% margin), 40 s gone: 57 s left, three more epochs of 15 s.
    assert run.cfg.epochs == 5 and schedule.total == 50 and "5 epochs instead of 10" in said[0]
    budget.keep_within(run, said.append)  # on plan now: nothing changes
    assert run.cfg.epochs == 5 and len(said) == 1
    run.budget_clock = None  # epochs the user gave (or a resumed run's) are never changed
    monkeypatch.setattr(budget.time, "monotonic", lambda: 90.0)
    budget.keep_within(run, said.append)
    assert run.cfg.epochs == 5
