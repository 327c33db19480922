"""The straggler view of multi-process runs in `nnperf plot`, `report` and `compare`, on run
directories written here in the shape `nnperf train --nproc 2` leaves (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from nnperf.analysis import logs, plot_runs, plots, ranks
from nnperf.analysis.report import write_report

from test_analysis import _write_jsonl, make_run

# Each rank's mean step time per epoch: rank 1 is slowest in epochs 1 and 2, rank 0 in epoch 3.
STEPS = {1: (0.020, 0.030), 2: (0.020, 0.040), 3: (0.025, 0.020)}
RATIOS = {1: 1.5, 2: 2.0, 3: 1.25}
HOSTS = ("hostA", "hostB")


def util(rank: int, epoch: int) -> float:
    """The mean cpu_util_pct of a rank's training rows in an epoch (its two rows are this -1 and +1)."""
    return 50.0 + 10 * rank + epoch


def make_multi_run(folder: Path, name: str, t0: float = 1000.0) -> Path:
    """A run of 2 processes, 3 epochs: telemetry/rank{R}/ with tagged rows (training at 1 Hz, then
    a validation row), metrics.jsonl whose train rows carry "ranks", config.yaml and env.json."""
    run = folder / name
    for rank in (0, 1):
        tags = {"run": name, "rank": rank, "local_rank": 0, "host": HOSTS[rank], "device": "cpu", "backend": "cpu"}
        train, val = [], []
        for epoch in STEPS:
            start = t0 + 4 * (epoch - 1) + 0.1 * rank
            for i, delta in enumerate((-1.0, 1.0)):
                train.append({"t": start + i, "phase": "train", "epoch": epoch, "step": 6 * (epoch - 1) + 3 * i,
                              **tags, "cpu_util_pct": util(rank, epoch) + delta, "proc_rss_mb": 700.0 + rank})
            val.append({"t": start + 2.5, "phase": "val", "epoch": epoch, "step": 6 * epoch, **tags,
                        "cpu_util_pct": 5.0, "proc_rss_mb": 700.0 + rank})  # not training: not in the mean
        _write_jsonl(run / "telemetry" / f"rank{rank}" / "train_epoch.jsonl", train)
        _write_jsonl(run / "telemetry" / f"rank{rank}" / "val_epoch.jsonl", val)
    metrics = []
    for epoch, steps in STEPS.items():
        shares = [{"rank": r, "host": HOSTS[r], "seconds": 6 * s, "images": 96, "data_wait_s": 0.001 * (r + 1),
                   "step_s": s} for r, s in enumerate(steps)]
        metrics.append({"t": t0 + 4 * epoch - 1, "epoch": epoch, "step": 6 * epoch, "phase": "train",
                        "loss": 2.0 / epoch, "top1": 0.2 * epoch, "top5": 0.8, "lr": 0.05, "images": 192, "seconds": 6 * max(steps),
                        "images_per_s": 192 / (6 * max(steps)), "data_wait_s": 0.001, "ranks": shares})
        metrics.append({"t": t0 + 4 * epoch - 0.5, "epoch": epoch, "step": 6 * epoch, "phase": "val",
                        "loss": 1.5 / epoch, "top1": 0.25 * epoch, "top5": 0.85, "images": 48, "seconds": 0.01})
    _write_jsonl(run / "metrics.jsonl", metrics)
    (run / "config.yaml").write_text("dataset: synthetic\nmodel: small_cifar\nepochs: 3\nbatch_size: 32\nlr: 0.05\n")
    (run / "env.json").write_text(json.dumps({"device": "cpu", "device_name": "Test CPU", "host": "hostA",
                                              "distributed": {"world_size": 2, "local_world_size": 1,
                                                              "backend": "gloo", "hosts": list(HOSTS)}}))
    return run


@pytest.fixture
def figures(monkeypatch):
    """Every (figure, axes) the plots draw, to read their legends after they are saved."""
    made = []
    subplots = plt.subplots

    def keep(*args, **kwargs):
        made.append(subplots(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(plt, "subplots", keep)
    return made


def _legend(figures, title: str) -> list[str]:
    ax = next(ax for _, ax in figures if ax.get_title().startswith(title))
    return ax.get_legend_handles_labels()[1]


def test_plot_writes_the_stragglers_and_a_line_per_rank(tmp_path, figures):
    run = make_multi_run(tmp_path, "multi")
    result = plot_runs([str(run)], tmp_path / "out")
    names = {p.name for p in result.written}
    assert {"stragglers.csv", "stragglers.png", "cpu_util_pct.png", "summary.csv"} <= names
    assert result.straggler_plot == tmp_path / "out" / "stragglers.png"
    strag = pd.read_csv(tmp_path / "out" / "stragglers.csv")
    assert list(strag.columns) == ranks.COLUMNS and len(strag) == 6
    assert list(strag["rank"]) == [0, 1] * 3 and list(strag["host"]) == list(HOSTS) * 3
    per_epoch = strag.drop_duplicates("epoch").set_index("epoch")
    assert per_epoch["slowest_rank"].to_dict() == {1: 1, 2: 1, 3: 0}
    assert per_epoch["ratio"].to_dict() == pytest.approx(RATIOS)
    assert list(strag.loc[strag["slowest"], "rank"]) == [1, 1, 0]
    assert list(strag["step_s"]) == pytest.approx([s for steps in STEPS.values() for s in steps])
    assert list(strag["util_pct"]) == pytest.approx([util(r, e) for e in STEPS for r in (0, 1)])
    assert set(strag["util_metric"]) == {"cpu_util_pct"}
    assert "stragglers per epoch" in result.table and "rank1" in result.table
    # A line per (rank, device) in the telemetry plots, and per rank in the step-time plot.
    assert _legend(figures, "Process CPU utilisation") == ["rank0 cpu", "rank1 cpu", "validation (shaded)"]
    assert _legend(figures, "Step time per rank") == ["rank0 hostA", "rank1 hostB", "slowest rank of the epoch"]
    util_csv = pd.read_csv(tmp_path / "out" / "cpu_util_pct.csv")
    assert set(util_csv["rank"]) == {0, 1} and len(util_csv) == 2 * 9


def test_telemetry_of_every_rank_is_read_and_keeps_its_tags(tmp_path):
    run = make_multi_run(tmp_path, "multi")
    (src,) = logs.sources([str(run)])
    assert [p.relative_to(run).as_posix() for p in src.telemetry] == [
        "telemetry/rank0/train_epoch.jsonl", "telemetry/rank0/val_epoch.jsonl",
        "telemetry/rank1/train_epoch.jsonl", "telemetry/rank1/val_epoch.jsonl"]
    tele = logs.telemetry([src])
    assert {"rank", "local_rank", "host"} <= set(tele.columns) and logs.has_ranks(tele)
    assert "rank" not in logs.metric_columns(tele) and "local_rank" not in logs.metric_columns(tele)
    assert plots.validation_spans(tele)["multi"] == [(2.5, 4.0), (6.5, 8.0), (10.5, 10.5)]  # rank 0's
    # Loose files from the rank folders belong to the run, not to runs named "rank0" and "rank1".
    loose = logs.sources([str(run / "telemetry" / "rank0" / "train_epoch.jsonl"),
                          str(run / "telemetry" / "rank1" / "train_epoch.jsonl"), str(run / "metrics.jsonl")])
    assert [(s.label, len(s.telemetry), s.metrics is not None) for s in loose] == [("multi", 2, True)]


def test_the_line_reader_gives_the_same_stragglers(tmp_path):
    run = make_multi_run(tmp_path, "multi")
    fast = ranks.table(*_frames(run))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")  # Arrow refuses it
    pd.testing.assert_frame_equal(ranks.table(*_frames(run)), fast)


def _frames(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    srcs = logs.sources([str(run)])
    return logs.telemetry(srcs), logs.metrics(srcs)


def test_report_has_the_straggler_section(tmp_path):
    run = make_multi_run(tmp_path, "multi")
    page = write_report([str(run)], tmp_path / "report.html").read_text()
    assert "Ranks: stragglers per epoch" in page
    for text in ("slowest rank", "slowest step (ms)", "fastest step (ms)", "ratio", "rank0 util (%)",
                 "rank1 util (%)", "<td>rank1</td>", "<td>rank0</td>", 'alt="stragglers"', "mean cpu_util_pct"):
        assert text in page, text


def test_compare_names_the_slowest_rank_when_a_run_has_several(run_cli, tmp_path):
    multi, single = make_multi_run(tmp_path, "multi"), make_run(tmp_path, "single")
    code, out, err = run_cli("compare", multi, single)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("slowest rank (mean step-time ratio)"))
    assert "rank1 in 2 of 3 epochs (1.58x)" in row and row.rstrip().endswith("-")
    code, out, err = run_cli("compare", single, make_run(tmp_path, "single2"))
    assert code == 0, err
    assert "slowest rank" not in out


def test_a_single_process_run_gets_none_of_it(run_cli, tmp_path, figures):
    single = make_run(tmp_path, "single")
    result = plot_runs([str(single)], tmp_path / "out")
    assert result.stragglers.empty and result.straggler_plot is None
    assert not any(p.name.startswith("stragglers") for p in (tmp_path / "out").iterdir())
    assert "stragglers" not in result.table
    assert _legend(figures, "Process CPU utilisation") == ["single", "validation (shaded)"]
    page = write_report([str(single)], tmp_path / "report.html").read_text()
    assert "stragglers" not in page
    code, out, err = run_cli("plot", single)
    assert code == 0 and "stragglers" not in out, err


def test_plot_command_writes_the_stragglers_into_the_run(run_cli, tmp_path):
    run = make_multi_run(tmp_path, "multi")
    code, out, err = run_cli("plot", run)
    assert code == 0, err
    assert "stragglers per epoch" in out
    assert (run / "plots" / "stragglers.csv").is_file() and (run / "plots" / "stragglers.png").is_file()


def test_edited_ranks_entries_are_skipped_not_fatal(tmp_path):
    run = make_multi_run(tmp_path, "multi")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0]["ranks"] = [{"rank": "x"}, {"rank": 1e300}, {"rank": True}, 5, {"rank": 1, "step_s": "abc"},
                        {"rank": 0, "step_s": 0.0}]
    rows[2]["ranks"] = "abc"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    strag = ranks.table(*_frames(run)).set_index(["epoch", "rank"])
    assert pd.isna(strag.loc[(1, 0), "step_s"])  # 0 s is no step time
    assert strag.loc[1, "slowest_rank"].isna().all() and strag.loc[2, "slowest_rank"].isna().all()
    assert (strag.loc[3, "slowest_rank"] == 0).all()  # the untouched epoch still names its slowest
    assert list(strag.loc[1, "util_pct"]) == pytest.approx([util(0, 1), util(1, 1)])  # from telemetry alone
