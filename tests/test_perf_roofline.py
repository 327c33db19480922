"""`nnperf roofline RUN_DIR` and `--model`: the training step placed on the roof."""

from __future__ import annotations

import csv
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
    half = json.loads((trained / "env.json").read_text())["precision"] in ("bf16", "fp16")  # 16-bit activations
    assert step["dram_bytes"] == pytest.approx(flops.bytes_per_step(
        model, "nesterov", 32, image_shape=(3, 16, 16), activation_element_bytes=2 if half else 4).total_bytes, rel=1e-5)
    rates = [json.loads(line)["images_per_s"] for line in (trained / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "train"]
    assert step["seconds"] == pytest.approx(32 / statistics.median(rates), rel=1e-5)  # the CSV keeps 6 digits
    assert "of the roof here" in out and "--peak-compute and --peak-bw" in out
    assert f"run `nnperf profile --resume {trained / 'checkpoints' / 'last.pt'}` for per-module points" in out


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


def test_a_profiled_run_gets_a_point_per_module_with_the_profile_s_times(run_cli, trained):
    code, out, err = run_cli("profile", "--resume", trained / "checkpoints" / "last.pt", "--epochs", "3",
                             "--warmup-iters", "0")
    assert code == 0, err
    with open(trained / "profile" / "modules.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["module"] for r in rows if r["depth"] == "0"} == {"features", "head"}  # small_cifar's children
    # Two children are too few points: the level below, the conv blocks (max-pools have no FLOPs).
    profiled = {r["module"]: r for r in rows if r["depth"] == "1" and r["type"] == "Sequential"}
    assert len(profiled) == 5
    code, out, err = run_cli("roofline", trained, "--peak-compute", "1", "--peak-bw", "50")
    assert code == 0, err
    table = pd.read_csv(trained / "plots" / "roofline.csv").set_index("id")
    assert list(table.index) == ["step", *(f"module:{n}" for n in profiled)]
    assert table.loc["module:features.0", "kernel"] == "features.0 (Sequential)"
    model = models.build("small_cifar", 3, 10, 16, width=8)
    counted = flops.step_flops(model, (32, 3, 16, 16), 10).by_module
    element = 2 if json.loads((trained / "env.json").read_text())["precision"] in ("bf16", "fp16") else 4
    traffic = flops.module_bytes_per_step(model, "nesterov", 32, (3, 16, 16), element, names=list(profiled))
    for name, row in profiled.items():
        point = table.loc[f"module:{name}"]
        device = "forward_device_us" in row and float(row["forward_device_us"]) + float(row["backward_device_us"])
        us = device or float(row["forward_cpu_us"]) + float(row["backward_cpu_us"])
        assert point["seconds"] == pytest.approx(us / 1e6, rel=1e-5)
        assert point["flops"] == pytest.approx(counted[name]["forward"] + counted[name]["backward"], rel=1e-5)
        assert point["dram_bytes"] == pytest.approx(traffic[name], rel=1e-5)
    # Every leaf of small_cifar is in a child: the children's bytes add up to the step's.
    children = flops.module_bytes_per_step(model, "nesterov", 32, (3, 16, 16), element)
    assert sum(children.values()) == flops.bytes_per_step(model, "nesterov", 32, image_shape=(3, 16, 16),
                                                          activation_element_bytes=element).total_bytes
    assert f"5 module points from {trained / 'profile' / 'modules.csv'} (times of the profiled step, batch 32, " \
           "under torch.profiler" in out


BAD_MODULES_CSV = ["module\n",  # what a --compile profile writes
                   "module,type,depth,forward_cpu_us,backward_cpu_us\nhead,Linear,x,1,1\n",
                   "module,type,depth,forward_cpu_us,backward_cpu_us\nhead,Linear\n", "\x00\xff\xfe"]


def test_an_unreadable_modules_csv_is_skipped_with_one_line(run_cli, trained):
    (trained / "profile").mkdir()
    for text in BAD_MODULES_CSV:
        (trained / "profile" / "modules.csv").write_bytes(text.encode("latin-1"))
        code, out, err = run_cli("roofline", trained, "--peak-compute", "1", "--peak-bw", "50")
        assert code == 0, err
        assert list(pd.read_csv(trained / "plots" / "roofline.csv")["id"]) == ["step"]
        skipped = [line for line in out.splitlines() if "modules.csv: skipped (" in line]
        assert len(skipped) == 1 and skipped[0].endswith("; only the whole step is placed"), out
