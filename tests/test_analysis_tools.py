"""`nnperf roofline`, `montage`, `compare` and `data show`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from nnperf.analysis import roofline
from nnperf.errors import UsageError

from conftest import SHARED, TINY
from test_analysis import make_run

HERE = Path(__file__).parent / "fixtures"
SHARED_NCU = SHARED / "fixtures"


def test_roofline_reads_the_details_page_with_its_noise():
    ks = {k.id: k for k in roofline.kernels(HERE / "ncu-details-small.csv")}
    saxpy, gemm = ks["0"], ks["1"]
    assert saxpy.flops == 2 * 1_000_000 + 500_000 and saxpy.dram_bytes == 1_000_000
    assert saxpy.seconds == pytest.approx(2e-6)
    assert gemm.flops == 2 * 4_000_000 + 100 * 4096 and gemm.dram_bytes == 200_000  # read + write
    assert gemm.seconds == pytest.approx(1e-6)  # 1,500 cycles at 1.5 GHz
    table = roofline.summary(list(ks.values()), peak_flops=10e12, peak_bw=1e12).set_index("id")
    assert table.loc["0", "intensity_flop_per_byte"] == pytest.approx(2.5)
    assert table.loc["0", "achieved_tflops"] == pytest.approx(1.25)
    assert table.loc["0", "bound"] == "memory" and table.loc["1", "bound"] == "compute"  # ridge at 10
    assert table.loc["0", "share_of_ceiling"] == pytest.approx(1.25 / 2.5)


@pytest.mark.skipif(not SHARED_NCU.is_dir(), reason="../shared/fixtures is not beside this clone")
def test_roofline_on_real_a100_exports_with_and_without_prof_lines():
    for name in ("ncu-details-a100-roofline.csv", "ncu-details-a100-roofline-with-prof-lines.csv"):
        ks = roofline.kernels(SHARED_NCU / name)
        assert len(ks) == 3
        gemm = ks[2]
        assert gemm.name.startswith("void gemm_v") and gemm.flops > 1e13 and gemm.dram_bytes > 1e11
        assert 0 < gemm.flops_per_s < 19.5e12  # below the A100's FP32 peak


@pytest.mark.skipif(not SHARED_NCU.is_dir(), reason="../shared/fixtures is not beside this clone")
@pytest.mark.parametrize("name,lacks", [("ncu-details-rtx5070-with-app-stdout.csv", "FLOP counters"),
                                        ("ncu-raw-b200.csv", "DRAM bytes")])
def test_roofline_names_the_metrics_an_export_lacks(name, lacks):
    with pytest.raises(UsageError, match=lacks):
        roofline.kernels(SHARED_NCU / name)


@pytest.mark.skipif(not SHARED_NCU.is_dir(), reason="../shared/fixtures is not beside this clone")
def test_roofline_reads_the_wide_raw_page():
    metrics = roofline.read_metrics(SHARED_NCU / "ncu-raw-b200.csv")
    assert len(metrics) == 16
    first = next(iter(metrics.values()))
    assert first["gpu__time_duration.sum"] < 1e-2  # ns converted to seconds


def test_roofline_command_writes_plot_and_summary(run_cli, tmp_path):
    code, out, err = run_cli("roofline", HERE / "ncu-details-small.csv", "--peak-compute", "10", "--peak-bw", "1000",
                             "--label", "<test GPU>", "--out", tmp_path / "r.png")
    assert code == 0, err
    assert Image.open(tmp_path / "r.png").size[0] > 500
    summary = pd.read_csv(tmp_path / "r.csv")
    assert list(summary["bound"]) == ["memory", "compute"] and "saxpy_like<float>" in out


def test_roofline_command_bad_input_is_one_line(run_cli, tmp_path):
    (tmp_path / "x.csv").write_text("no header here\n")
    for args, expected in ((["x.csv", "--peak-compute", "10", "--peak-bw", "100"], "no Nsight Compute CSV header"),
                           ([str(HERE / "ncu-details-small.csv"), "--peak-compute", "0", "--peak-bw", "100"],
                            "--peak-compute: must be a positive number")):
        code, _, err = run_cli("roofline", *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_montage_grids_the_pngs_with_labels(run_cli, tmp_path):
    for i, size in enumerate([(200, 100), (400, 300), (100, 100), (300, 150)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(tmp_path / f"p{i}.png")
    code, out, err = run_cli("montage", tmp_path, "--cols", "3", "--out", tmp_path / "m.png")
    assert code == 0, err
    grid = Image.open(tmp_path / "m.png")
    assert grid.size[0] == 3 * 400  # cells as wide as the widest image
    assert grid.size[1] == 2 * (400 + 28)  # two rows; the square one, scaled to 400 wide, is tallest
    code, _, err = run_cli("montage", tmp_path / "none")
    assert code == 2 and "not a folder" in err


def test_compare_shows_runs_side_by_side_with_the_config_keys_that_differ(run_cli, tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    (a / "config.yaml").write_text("model: fast\nlr: 0.1\nepochs: 2\nname: <a>\n")
    (b / "config.yaml").write_text("model: fast\nlr: 0.2\nepochs: 2\nname: b\n")
    code, out, err = run_cli("compare", a, b, "--csv", tmp_path / "c.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "c.csv", index_col="field")
    assert list(table.columns) == ["a", "b"]
    assert table.loc["config: lr", "a"] == "0.1" and table.loc["config: lr", "b"] == "0.2"
    assert table.loc["final top-1"].astype(float).tolist() == [0.7, 0.7]
    assert "differs: name" in table.index and "differs: model" not in table.index


def test_compare_reads_an_old_run_s_renamed_settings_under_their_new_names(run_cli, tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    (a / "config.yaml").write_text("model: fast\nclear_perf: true\n")  # written before the rename
    (b / "config.yaml").write_text("model: fast\nclear_telemetry: false\n")
    code, out, err = run_cli("compare", a, b, "--csv", tmp_path / "c.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "c.csv", index_col="field")
    assert table.loc["differs: clear_telemetry"].tolist() == ["True", "False"]
    assert "differs: clear_perf" not in table.index


def test_data_show_prints_counts_and_writes_a_grid(run_cli, tmp_path):
    code, out, err = run_cli("data", "show", "--dataset", "synthetic", "--out", tmp_path / "g.png",
                             "--per-class", "3")
    assert code == 0, err
    assert "total" in out.splitlines()[-2]
    grid = Image.open(tmp_path / "g.png")
    assert grid.size[0] == 3 * 96
