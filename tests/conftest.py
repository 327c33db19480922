"""Shared fixtures: every test runs in its own folder with its own dataset cache."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from nnperf import cli

SHARED = Path(__file__).resolve().parents[2] / "shared"

# A tiny synthetic run: 8-channel model, a few hundred 16x16 images; seconds on a 2-core CPU.
TINY = ["--dataset", "synthetic", "--synthetic-size", "192", "--image-size", "16", "--width", "8",
        "--batch-size", "32", "--eval-batch-size", "64", "--lr", "0.05"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NNPERF_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _policy_prefers_the_rules(request, monkeypatch):
    """The measured precision/memory-format policy, with made-up timings in which the rules' choice
    is fastest: every run is as fast to set up and as predictable as with --policy static, and the
    policy's own plumbing still runs. Tests marked `measured_policy` time the candidates for real."""
    if request.node.get_closest_marker("measured_policy"):
        return
    import torch

    from nnperf import device as devices
    from nnperf.perf import policy

    def timed(model, x, y, dev, cand, reference, best_warmup):
        rule = devices.best_mixed(dev)
        layout, _ = devices.choose_channels_last(dev, rule, None)
        fastest = cand == policy.Candidate(rule.name, layout)
        return policy.Timing(cand, 200.0 if fastest else 100.0), 1.0, 0.01

    monkeypatch.setattr(policy, "_time_candidate", timed)


@pytest.fixture(autouse=True)
def _known_peak(request, monkeypatch):
    """A made-up peak of 100 GFLOP/s for MFU, instead of measuring this CPU's (seconds, once per cache)
    in every training test. Tests marked `measured_peak` measure it."""
    if request.node.get_closest_marker("measured_peak"):
        return
    from nnperf.perf import peak

    monkeypatch.setattr(peak, "peak_flops", lambda dev, precision: 100e9)
    monkeypatch.setattr(peak, "is_cached", lambda dev, precision: True)


@pytest.fixture
def run_cli(capsys):
    """Run `nnperf ARGS` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write `array` (uint8) in the IDX format MNIST uses."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_idx_folder(folder: Path, n_train: int = 40, n_test: int = 20, size: int = 28, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, size, size)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return folder


def make_cifar_folder(root: Path, hundred: bool = False, per_batch: int = 10) -> Path:
    """Batch pickles in the layout and encoding of cifar-10-batches-py / cifar-100-python."""
    rng = np.random.default_rng(0)
    if hundred:
        folder = root / "cifar-100-python"
        files, label_key, meta = {"train": 50, "test": 20}, "fine_labels", ("meta", "fine_label_names", 100)
    else:
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": per_batch}
        label_key, meta = "labels", ("batches.meta", "label_names", 10)
    folder.mkdir(parents=True, exist_ok=True)
    n_classes = meta[2]
    for name, n in files.items():
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: [int(i) % n_classes for i in range(n)], "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / meta[0], "wb") as f:
        pickle.dump({meta[1]: [f"c{i}" for i in range(n_classes)]}, f)
    return folder
