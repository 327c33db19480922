"""`nnperf plot` and the summary on generated run directories and old-format logs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from nnperf.analysis import logs, plot_runs
from nnperf.analysis.plots import phase_spans


def _write_jsonl(path: Path, rows: list[dict], torn_tail: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + ('{"t": 12, "power' if torn_tail else ""))


def make_run(folder: Path, name: str, t0: float = 1000.0, power: list[float] | None = None) -> Path:
    """A run directory: 2 epochs, telemetry at 1 Hz for the cpu and a fake GPU, val after each epoch."""
    run = folder / name
    power = power or [100.0, 200.0, 300.0, 400.0, 150.0, 250.0]
    train, val = [], []
    for i, p in enumerate(power):
        phase = "val" if i in (2, 5) else "train"
        row = {"t": t0 + i, "run": name, "phase": phase, "epoch": 1 + i // 3, "step": i, "device": "cuda:0",
               "backend": "nvml", "power_w": p, "energy_j": 10.0 * i, "gpu_util_pct": 50.0 + i}
        (val if phase == "val" else train).append(row)
        (val if phase == "val" else train).append({"t": t0 + i + 0.5, "run": name, "phase": phase,
                                                   "epoch": 1 + i // 3, "step": i, "device": "cpu",
                                                   "backend": "cpu", "cpu_util_pct": 90.0})
    _write_jsonl(run / "telemetry" / "train_epoch.jsonl", train, torn_tail=True)
    _write_jsonl(run / "telemetry" / "val_epoch.jsonl", val)
    metrics = []
    for epoch in (1, 2):
        metrics.append({"t": t0 + 3 * epoch, "epoch": epoch, "step": 10 * epoch, "phase": "train", "loss": 2.0 / epoch,
                        "top1": 0.3 * epoch, "top5": 0.8, "lr": 0.1 / epoch, "images": 1000, "seconds": 2.0 * epoch,
                        "images_per_s": 500.0 / epoch, "data_wait_s": 0.01, "energy_j": 20.0})
        metrics.append({"t": t0 + 3 * epoch + 1, "epoch": epoch, "step": 10 * epoch, "phase": "val", "loss": 1.5 / epoch,
                        "top1": 0.35 * epoch, "top5": 0.85, "images": 200, "seconds": 0.5, "energy_j": 5.0})
    _write_jsonl(run / "metrics.jsonl", metrics)
    return run


def test_plot_writes_a_png_and_csv_per_metric_curves_and_the_summary(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", t0=5000.0, power=[50.0] * 6)
    result = plot_runs([str(a), str(b)], tmp_path / "out")
    names = {p.name for p in result.written}
    for metric in ("power_w", "energy_j", "gpu_util_pct", "cpu_util_pct"):
        assert {f"{metric}.png", f"{metric}.csv"} <= names
        assert Image.open(tmp_path / "out" / f"{metric}.png").size[0] > 400
    assert {"curve_loss.png", "curve_top1.png", "curve_top5.png", "curve_lr.png", "summary.csv"} <= names
    assert "temp_c" in result.skipped and "power_w" not in result.skipped
    power = pd.read_csv(tmp_path / "out" / "power_w.csv")
    assert len(power) == 12 and set(power["run"]) == {"a", "b"}  # the torn last line was skipped
    assert power.loc[power["run"] == "b", "elapsed_s"].min() == 0  # each run's own clock
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("run")
    assert summary.loc["a", "power_w_mean"] == pytest.approx(1400 / 6)
    assert summary.loc["a", "power_w_max"] == 400
    assert summary.loc["a", "power_w_p95"] == pytest.approx(pd.Series([100, 200, 300, 400, 150, 250.0]).quantile(0.95))
    assert summary.loc["a", "images_per_s"] == pytest.approx(2000 / 6)
    assert summary.loc["a", "energy_j"] == 50 and summary.loc["a", "energy_per_epoch_j"] == 25
    assert summary.loc["a", "best_val_top1"] == pytest.approx(0.7)
    assert summary.loc["a", "duration_s"] == pytest.approx(5.5)
    assert "power_w (W)" in result.table and "400.0" in result.table


def test_only_the_asked_metrics_and_the_missing_ones_are_named(tmp_path):
    a = make_run(tmp_path, "a")
    result = plot_runs([str(a)], tmp_path / "out", only=["power_w", "temp_c"])
    assert result.skipped == ["temp_c"]
    assert not (tmp_path / "out" / "gpu_util_pct.png").exists() and (tmp_path / "out" / "power_w.png").exists()


def test_old_profiler_logs_with_timestamps_and_no_phase_plot(tmp_path):
    old = tmp_path / "old_logs"
    _write_jsonl(old / "train_epoch.jsonl", [{"timestamp": f"2024-05-01T10:00:0{i}", "gpu_util_pct": 90 + i,
                                               "torch_mem_alloc_mb": 100.0} for i in range(4)])
    _write_jsonl(old / "val_epoch.jsonl", [{"timestamp": "2024-05-01T10:00:05", "gpu_util_pct": 40}])
    srcs = logs.sources([str(old / "train_epoch.jsonl"), str(old / "val_epoch.jsonl")])
    assert len(srcs) == 1 and srcs[0].label == "old_logs"
    tele = logs.telemetry(srcs)
    assert list(tele["phase"]) == ["train"] * 4 + ["val"]
    assert list(tele["elapsed_s"]) == [0, 1, 2, 3, 5]
    result = plot_runs([str(old)], tmp_path / "out")
    assert (tmp_path / "out" / "torch_mem_alloc_mb.png").exists()
    assert "curve_loss.png" not in {p.name for p in result.written}


def test_runs_with_the_same_folder_name_get_distinct_labels(tmp_path):
    make_run(tmp_path / "machine1", "r")
    make_run(tmp_path / "machine2", "r")
    labels = [s.label for s in logs.sources([str(tmp_path / "machine1" / "r"), str(tmp_path / "machine2" / "r")])]
    assert labels == ["machine1/r", "machine2/r"]


def test_validation_spans_reach_the_next_phase():
    rows = pd.DataFrame({"t": [0, 1, 2, 3, 4, 5], "elapsed_s": [0, 1, 2, 3, 4, 5],
                         "phase": ["train", "val", "val", "train", "train", "val"]})
    assert phase_spans(rows) == [(1.0, 3.0), (5.0, 5.0)]


def test_plot_command_bad_paths_are_one_line(run_cli, tmp_path):
    code, out, err = run_cli("plot", "nowhere")
    assert code == 2 and err.strip() == "nnperf plot: error: nowhere: no such file or directory " \
                                         "(give a run directory or a .jsonl file)"
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("plot", "empty")
    assert code == 2 and "no metrics.jsonl or telemetry/*.jsonl" in err and len(err.strip().splitlines()) == 1


def test_plot_command_prints_the_summary_and_writes_into_the_run(run_cli, tmp_path):
    run = make_run(tmp_path, "a")
    code, out, err = run_cli("plot", str(run))
    assert code == 0, err
    assert "skipped (no file has them): " in out and "images/s" in out
    assert (run / "plots" / "power_w.png").exists() and (run / "plots" / "summary.csv").exists()


def test_a_bad_line_inside_or_a_changing_type_falls_back_to_the_line_reader(tmp_path):
    path = tmp_path / "r" / "telemetry" / "train_epoch.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"t": 1, "power_w": 10}\nnot json\n\n{"t": 2, "power_w": 12.5}\n{"t": 3, "power_w": "N/A"}\n')
    df = logs.read_jsonl_frame(path)
    assert list(df["t"]) == [1, 2, 3]
    tele = logs.telemetry(logs.sources([str(tmp_path / "r")]))
    assert tele["power_w"].tolist()[:2] == [10, 12.5] and pd.isna(tele["power_w"].iloc[2])
    assert "power_w" in logs.metric_columns(tele)  # "N/A" is absent, the numbers stay


def test_labels_grow_until_runs_are_told_apart(tmp_path):
    make_run(tmp_path / "A" / "runs", "r1")
    make_run(tmp_path / "B" / "runs", "r1")
    labels = [s.label for s in logs.sources([str(tmp_path / "A" / "runs" / "r1"), str(tmp_path / "B" / "runs" / "r1")])]
    assert labels == ["A/runs/r1", "B/runs/r1"]


def test_a_whole_last_line_without_newline_is_kept_and_a_torn_one_dropped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"t": 1, "power_w": 5}\n{"t": 2, "power_w": 6}')
    assert list(logs.read_jsonl_frame(path)["t"]) == [1, 2]
    path.write_text('{"t": 1, "power_w": 5}\n{"t": 2, "pow')
    assert list(logs.read_jsonl_frame(path)["t"]) == [1]


def test_format_number_for_people():
    from nnperf.analysis.summary import format_number

    assert [format_number(v) for v in (None, float("nan"), 12345.6, 0.123456, 7, "x")] == \
        ["-", "-", "12,346", "0.1235", "7", "x"]
    assert format_number(0.123456, digits=2) == "0.12"
