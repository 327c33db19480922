"""`nnperf roofline RUN_DIR` and `--model`: the training step placed on the roof."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from nnperf import models
from nnperf.perf import flops, peak

from conftest import TINY

NCU = Path(__file__).parent / "fixtures" / "ncu-details-small.csv"


@pytest.fixture
def trained(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--name", "r", "--no-telemetry")
    assert code == 0, err
    return tmp_path / "runs" / "r"


def test_a_run_s_step_is_placed_with_its_flops_bytes_and_measured_time(run_cli, trained):
    code, out, err = run_cli("roofline", trained, "--peak-compute", "1", "--peak-bw", "50", "--ncu", NCU)
    assert code == 0, err
    table = pd.read_csv(trained / "plots" / "roofline.csv")
    assert (trained / "plots" / "roofline.png").stat().st_size > 0
    assert list(table["id"].astype(str)) == ["step", "0", "1"]  # the step, then the Nsight kernels
    step = table.iloc[0]
    model = models.build("small_cifar", 3, 10, 16, width=8)
    assert step["flops"] == pytest.approx(flops.step_flops(model, (32, 3, 16, 16), 10).total, rel=1e-5)
    assert step["dram_bytes"] == pytest.approx(flops.bytes_per_step(model, "nesterov", 32, image_shape=(3, 16, 16))
                                               .total_bytes, rel=1e-5)
    rates = [json.loads(line)["images_per_s"] for line in (trained / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "train"]
    assert step["seconds"] == pytest.approx(32 / statistics.median(rates), rel=1e-5)  # the CSV keeps 6 digits
    assert "of the roof here" in out and "--peak-compute and --peak-bw" in out


def test_the_roof_defaults_to_nnperf_peak_s_measurement(run_cli, trained, monkeypatch):
    monkeypatch.setattr(peak, "cached_or_measure", lambda dev, dtypes: {
        "device": "test cpu", "cache_file": "c.json", "bandwidth": {"copy_bytes_per_s": 20e9, "triad_bytes_per_s": 25e9}})
    code, out, err = run_cli("roofline", trained)
    assert code == 0, err
    assert "roof 100 GFLOP/s and 25.0 GB/s from nnperf peak on test cpu" in out  # conftest's peak, the triad


def test_a_step_timed_here_without_a_run(run_cli, tmp_path):
    code, out, err = run_cli("roofline", "--model", "convnet3", "--dataset", "mnist", "--batch-size", "4",
                             "--precision", "fp32", "--peak-compute", "1", "--peak-bw", "50", "--out", "r.png")
    assert code == 0, err
    assert "timed here" in out and (tmp_path / "r.png").is_file() and (tmp_path / "r.csv").is_file()


def test_bad_roofline_input_is_one_line(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, says in ((["empty"], "not an nnperf run directory"), (["nothing.csv"], "no such file"),
                       ([str(NCU)], "needs --peak-compute and --peak-bw"), ([], "give an `ncu --csv` export"),
                       (["empty", "--model", "fast"], "not both"),
                       (["--model", "convnet3", "--out", "."], "--out .: is a folder"),
                       (["--model", "convnet3", "--out", ""], "--out: must name a file or folder")):
        code, out, err = run_cli("roofline", *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (args, err)


def test_a_run_without_training_epochs_says_so(run_cli, trained):
    (trained / "metrics.jsonl").write_text('{"phase": "val", "epoch": 1}\n')
    code, out, err = run_cli("roofline", trained, "--peak-compute", "1", "--peak-bw", "50")
    assert code == 2 and "no training epoch with images/s" in err
