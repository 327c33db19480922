"""MFU in training: FLOPs per image counted once, the measured peak, per-epoch rows, lines, compare."""

from __future__ import annotations

import json

import pytest

from nnperf import models
from nnperf.perf import flops

from conftest import TINY


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_training_epoch_has_its_mfu_against_the_peak(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--name", "m", "--no-telemetry")
    assert code == 0, err
    rows = _rows(tmp_path / "runs/m/metrics.jsonl")
    train = [r for r in rows if r["phase"] == "train"]
    expected = flops.model_flops_per_image(models.build("small_cifar", 3, 10, 16, width=8), (3, 16, 16), 10)
    for r in train:
        assert r["model_flops_per_image"] == pytest.approx(expected)
        assert r["mfu"] == pytest.approx(expected * r["images_per_s"] / 100e9)  # conftest's made-up peak
        assert 0 < r["mfu"] < 1
    assert not any("mfu" in r for r in rows if r["phase"] == "val")
    assert all(" | MFU " in line for line in out.splitlines() if line.startswith("e"))
    code, out, err = run_cli("compare", tmp_path / "runs/m")
    assert code == 0 and "MFU (mean of epochs)" in out


def test_sam_counts_two_passes_per_step(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "s", "--optimizer", "sam", "--no-telemetry")
    assert code == 0, err
    row = _rows(tmp_path / "runs/s/metrics.jsonl")[0]
    single = flops.model_flops_per_image(models.build("small_cifar", 3, 10, 16, width=8), (3, 16, 16), 10)
    assert row["model_flops_per_image"] == pytest.approx(2 * single)


def test_a_model_flopcounter_cannot_follow_still_trains_without_mfu(run_cli, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no meta kernel")

    monkeypatch.setattr(flops, "model_flops_per_image", fail)
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "f", "--no-telemetry")
    assert code == 0, err
    assert "FLOPs of small_cifar could not be counted (RuntimeError: no meta kernel); no MFU" in out
    assert not any("mfu" in r for r in _rows(tmp_path / "runs/f/metrics.jsonl"))


@pytest.mark.measured_peak
def test_the_peak_is_measured_once_per_device_then_read_from_the_cache(run_cli, tmp_path, monkeypatch):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "a", "--no-telemetry")
    assert code == 0, err
    assert "peak for MFU" in out and list((tmp_path / "cache" / "peak").glob("*.json"))
    mfu = _rows(tmp_path / "runs/a/metrics.jsonl")[0]["mfu"]
    assert 0 < mfu < 1
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "b", "--no-telemetry")
    assert code == 0, err
    assert "peak for MFU" not in out and "mfu" in _rows(tmp_path / "runs/b/metrics.jsonl")[0]
