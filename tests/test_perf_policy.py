"""The measured precision/memory-format policy: real timings, safety, the cache, overrides, resume."""

from __future__ import annotations

import json

import pytest
import torch

from nnperf import device as devices
from nnperf import models
from nnperf.perf import policy

from conftest import TINY

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return models.build("small_cifar", 3, 10, 16, width=8)


@pytest.mark.measured_policy
def test_measure_times_every_candidate_and_leaves_the_model_and_rng_alone():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cands = policy.candidates(CPU, devices.Precision("bf16", ""), None, None)
    assert cands == [policy.Candidate(p, cl) for p in policy.precisions(CPU, devices.Precision("bf16", ""))
                     for cl in (False, True)]
    timings = policy.measure(model, (3, 16, 16), 10, 8, CPU, cands)
    assert [t.candidate for t in timings] == cands
    assert all(t.images_per_s is None or t.images_per_s > 0 for t in timings)
    assert policy.fastest(timings) is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.measured_policy
def test_an_unsafe_candidate_is_never_chosen(monkeypatch):
    real = policy._step

    def nan_in_bf16(m, x, y, dev, precision):
        loss = real(m, x, y, dev, precision)
        return float("nan") if precision.name == "bf16" else loss

    monkeypatch.setattr(policy, "_step", nan_in_bf16)
    cands = [policy.Candidate("fp32", False), policy.Candidate("bf16", False)]
    timings = policy.measure(_model(), (3, 16, 16), 10, 8, CPU, cands)
    assert timings[1].images_per_s is None and "unsafe: non-finite loss" in timings[1].note
    assert policy.fastest(timings).candidate == cands[0]


@pytest.mark.measured_policy
def test_a_loss_far_from_fp32_s_is_unsafe(monkeypatch):
    real = policy._step
    monkeypatch.setattr(policy, "_step", lambda m, x, y, dev, p: real(m, x, y, dev, p) * (2 if p.name == "bf16" else 1))
    cands = [policy.Candidate("fp32", True), policy.Candidate("bf16", True)]
    timings = policy.measure(_model(), (3, 16, 16), 10, 8, CPU, cands)
    assert "against fp32's" in timings[1].note and timings[1].images_per_s is None


def test_the_choice_is_cached_per_device_model_shape_and_batch(monkeypatch):
    cands = [policy.Candidate("fp32", False), policy.Candidate("fp32", True)]
    model_id = {"name": "small_cifar", "width": 8}
    first = policy.choose(_model(), model_id, (3, 16, 16), 10, 32, CPU, cands, cands[0])
    assert not first.cached and first.candidate == policy.pick(first.timings, cands[0])

    def no_timing(*args):
        raise AssertionError("measured again")

    with monkeypatch.context() as patched:
        patched.setattr(policy, "_time_candidate", no_timing)
        again = policy.choose(_model(), model_id, (3, 16, 16), 10, 32, CPU, cands, cands[0])
    assert again.cached and again.candidate == first.candidate and "cached measurement" in again.reason()
    other_batch = policy.choose(_model(), model_id, (3, 16, 16), 10, 16, CPU, cands, cands[0])
    assert not other_batch.cached


def test_the_rules_stand_unless_another_candidate_is_clearly_faster():
    rules, other = policy.Candidate("fp32", False), policy.Candidate("fp32", True)
    close = [policy.Timing(rules, 100.0), policy.Timing(other, 108.0)]
    assert policy.pick(close, rules) == rules  # 8% is within what a short probe can tell
    clear = [policy.Timing(rules, 100.0), policy.Timing(other, 200.0)]
    assert policy.pick(clear, rules) == other  # channels_last at 2x, as on an AVX2 CPU
    unsafe_rules = [policy.Timing(rules, None, "unsafe: non-finite loss"), policy.Timing(other, 50.0)]
    assert policy.pick(unsafe_rules, rules) == other
    assert policy.pick([policy.Timing(rules, None)], rules) is None
    choice = policy.Choice(rules, close, cached=False, probe_s=1.0)
    assert "the rules' choice, within 10% of the fastest" in choice.reason()


def test_the_table_marks_the_choice_and_compares_with_fp32_nchw():
    timings = [policy.Timing(policy.Candidate("fp32", False), 100.0), policy.Timing(policy.Candidate("bf16", True), 250.0),
               policy.Timing(policy.Candidate("bf16", False), None, "unsafe: non-finite loss")]
    text = policy.table(timings, policy.Candidate("bf16", True))
    assert "bf16 channels_last" in text and "2.50x" in text and "<- chosen" in text.splitlines()[2]
    assert "unsafe: non-finite loss" in text.splitlines()[3]


def _env(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "env.json").read_text())


def test_train_records_what_the_policy_measured_and_chose(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "m", "--no-telemetry")
    assert code == 0, err
    env = _env(tmp_path, "m")
    assert env["policy"]["chosen"] == f"{env['precision']} {'channels_last' if env['channels_last'] else 'NCHW'}"
    assert len(env["policy"]["candidates"]) >= 2 and "measured in" in out.splitlines()[0]


def test_settings_the_user_gave_are_not_measured(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "p", "--precision", "fp32", "--no-telemetry")
    assert code == 0, err
    env = _env(tmp_path, "p")
    assert env["precision"] == "fp32" and {c["precision"] for c in env["policy"]["candidates"]} == {"fp32"}
    assert "requested with --precision" in out.splitlines()[0]
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "both", "--precision", "fp32",
                             "--channels-last", "--no-telemetry")
    assert code == 0, err
    assert "policy" not in _env(tmp_path, "both") and _env(tmp_path, "both")["channels_last"] is True
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "static", "--policy", "static",
                             "--no-telemetry")
    assert code == 0, err
    assert "policy" not in _env(tmp_path, "static")


def test_a_resumed_run_keeps_its_precision_and_layout(run_cli, tmp_path, monkeypatch):
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--name", "r", "--max-steps", "3", "--no-telemetry")
    assert code == 0, err
    started = _env(tmp_path, "r")
    # The cache is gone and the device now times fp32 NCHW fastest: the run still ends as it began.
    monkeypatch.setenv("NNPERF_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr(policy, "_time_candidate", lambda model, x, y, dev, cand, ref, best: (
        policy.Timing(cand, 500.0 if cand == policy.Candidate("fp32", False) else 1.0), 1.0, 0.01))
    code, out, err = run_cli("train", "--resume", tmp_path / "runs/r/checkpoints/last.pt")
    assert code == 0, err
    resumed = _env(tmp_path, "r")
    assert (resumed["precision"], resumed["channels_last"]) == (started["precision"], started["channels_last"])
    assert "kept from the run's start" in out.splitlines()[0]
