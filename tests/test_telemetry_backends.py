"""Telemetry backends against vendor libraries faked at their API boundary and real tool outputs."""

import json
import subprocess
import types
from pathlib import Path

import pytest
import torch

from nnperf.telemetry.backends import clean, number
from nnperf.telemetry.backends.amdsmi import AmdSmiBackend, visible_index
from nnperf.telemetry.backends.cpu import CpuBackend, Rapl
from nnperf.telemetry.backends.nvml import NvmlBackend, decode_reasons, nvml_index
from nnperf.telemetry.backends.rocm_smi import (AmdSmiCliBackend, RocmSmiBackend, amd_smi_gpus, parse_amd_smi_gpu,
                                                parse_rocm_smi_card, rocm_smi_cards)

from conftest import SHARED
from fake_vendor import fake_amdsmi, fake_pynvml

FIXTURES = SHARED / "fixtures"
OWN = Path(__file__).parent / "fixtures"


def test_number_reads_the_spellings_tools_use():
    assert number("31.0") == 31.0 and number(" 1,024 ") == 1024.0 and number("36 C") == 36.0
    assert number(7) == 7.0
    for na in ("N/A", "N/A (Secondary die)", "", "[N/A]", None, float("nan"), True, {"value": 1}):
        assert number(na) is None


def test_clean_keeps_known_finite_metrics_only():
    row = clean({"gpu_util_pct": "55", "power_w": float("inf"), "bogus": 1, "temp_c": -5,
                 "throttle_reasons": "sw_power_cap", "vram_used_mb": "N/A"})
    assert row == {"gpu_util_pct": 55.0, "throttle_reasons": "sw_power_cap"}
    with pytest.raises(TypeError):
        clean([1, 2])


def test_nvml_backend_reads_every_metric_in_its_unit():
    nv = fake_pynvml()
    b = NvmlBackend(torch.device("cuda", 0), nv=nv)
    row = b.sample()
    assert row.pop("throttle_reasons") == "sw_power_cap,sw_thermal"
    assert row == pytest.approx({
        "gpu_util_pct": 87, "mem_util_pct": 41, "vram_used_mb": 4_299_161_600 / 2**20,
        "vram_total_mb": 15_843_721_216 / 2**20, "temp_c": 64, "power_w": 68.45, "energy_j": 123_456.789,
        "sm_clock_mhz": 1590, "mem_clock_mhz": 5000, "pcie_tx_kbps": 1200, "pcie_rx_kbps": 52_000}, rel=1e-9)
    # PCIe is read at most once a second: each query blocks for its 20 ms window.
    assert "pcie_tx_kbps" not in b.sample()


def test_nvml_unsupported_queries_are_dropped_for_good_with_a_reason():
    nv = fake_pynvml(unsupported={"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPcieThroughput"})
    b = NvmlBackend(torch.device("cuda", 0), nv=nv)
    row = b.sample()
    assert "energy_j" not in row and "power_w" in row
    nv.calls.clear()
    b.sample()
    assert "nvmlDeviceGetTotalEnergyConsumption" not in nv.calls  # never asked again
    recorded, missing = b.metrics()
    assert "energy_j" not in recorded and "Not Supported" in missing["energy_j"]


def test_nvml_old_bindings_use_the_throttle_reasons_call():
    nv = fake_pynvml()
    del nv.nvmlDeviceGetCurrentClocksEventReasons
    assert NvmlBackend(torch.device("cuda", 0), nv=nv).sample()["throttle_reasons"] == "gpu_idle"
    assert decode_reasons(0) == "none"


def test_cuda_visible_devices_map_to_nvml_devices():
    assert nvml_index(0, {}) == 0
    assert nvml_index(0, {"CUDA_VISIBLE_DEVICES": "1,0"}) == 1
    assert nvml_index(1, {"CUDA_VISIBLE_DEVICES": "2,GPU-1234"}) == "GPU-1234"
    nv = fake_pynvml()
    b = NvmlBackend.__new__(NvmlBackend)
    b.nv = nv
    assert b._handle("GPU-1234") == ("handle", 1)  # a unique UUID prefix, as CUDA accepts it
    assert b._handle(0) == ("handle", 0)


@pytest.mark.parametrize("rocm", ["6.0", "6.4"])
def test_amdsmi_backend_across_releases(rocm):
    lib = fake_amdsmi(rocm)
    b = AmdSmiBackend(torch.device("cuda", 0), lib=lib)
    row = b.sample()
    assert row["gpu_util_pct"] == 97 and row["mem_util_pct"] == 35
    assert row["power_w"] == (212 if rocm == "6.4" else 187)
    assert row["energy_j"] == pytest.approx(10_000_000 * 15.259 / 1e6)
    assert row["temp_c"] == 61 and row["temp_hotspot_c"] == 74  # millidegrees on one path, scaled
    assert row["sm_clock_mhz"] == 2100 and row["mem_clock_mhz"] == 1000
    assert row["vram_used_mb"] == 9120 and row["vram_total_mb"] == 16368


def test_amdsmi_na_values_stay_absent():
    b = AmdSmiBackend(torch.device("cuda", 0), lib=fake_amdsmi("6.4", activity_na=True))
    row = b.sample()
    assert "gpu_util_pct" not in row and "mem_util_pct" not in row and "power_w" in row
    _, missing = b.metrics()
    assert "N/A" in missing["gpu_util_pct"]


def test_visible_devices_for_amd():
    assert visible_index(0, {"HIP_VISIBLE_DEVICES": "1"}) == 1
    assert visible_index(0, {"ROCR_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": ""}) == 0
    assert visible_index(1, {}) == 1


ROCM_SMI = sorted(FIXTURES.glob("rocm-smi-*.json")) if FIXTURES.is_dir() else []


@pytest.mark.skipif(not ROCM_SMI, reason="shared fixtures not present")
@pytest.mark.parametrize("path", ROCM_SMI, ids=lambda p: p.name)
def test_rocm_smi_real_outputs_of_rocm_5_and_6(path):
    cards = rocm_smi_cards(path.read_text())
    row = parse_rocm_smi_card(cards[0])
    assert {"gpu_util_pct", "temp_c", "sm_clock_mhz", "mem_clock_mhz"} <= set(row)
    assert all(isinstance(v, float) for v in row.values())
    assert 0 <= row["gpu_util_pct"] <= 100 and 10 < row["temp_c"] < 110
    if "6.0.2-rx6700xt" in path.name:
        assert "power_w" not in row  # "N/A (Secondary die)": absent, not 0
    if "5.7.1-mi100" in path.name:
        assert len(cards) == 6 and row["vram_total_mb"] == pytest.approx(32752, abs=1)
    if "mi250" in path.name:
        assert "energy_j" in row


def test_rocm_smi_own_fixtures_cover_both_key_generations():
    old = parse_rocm_smi_card(rocm_smi_cards((OWN / "rocm-smi-5.x.json").read_text())[1])
    new = parse_rocm_smi_card(rocm_smi_cards((OWN / "rocm-smi-6.1.json").read_text())[0])
    assert old == {"gpu_util_pct": 99.0, "mem_util_pct": 47.0, "power_w": 251.0, "temp_c": 71.0,
                   "temp_hotspot_c": 88.0, "temp_mem_c": 76.0, "sm_clock_mhz": 1502.0, "mem_clock_mhz": 1200.0,
                   "vram_used_mb": 30720.0, "vram_total_mb": 32752.0}
    assert new["mem_util_pct"] == 12.0 and new["power_w"] == 305.0 and new["energy_j"] == pytest.approx(1234.5678)


AMD_SMI = sorted(FIXTURES.glob("amd-smi-metric-*.json")) if FIXTURES.is_dir() else []


@pytest.mark.skipif(not AMD_SMI, reason="shared fixtures not present")
def test_amd_smi_metric_real_output():
    gpu = amd_smi_gpus((FIXTURES / "amd-smi-metric-6.x-rx6600.json").read_text())[0]
    row = parse_amd_smi_gpu(gpu)
    assert row["gpu_util_pct"] == 1 and row["power_w"] == 6 and row["sm_clock_mhz"] == 800
    assert row["temp_c"] == 36 and row["vram_total_mb"] == 8176 and row["energy_j"] == 0
    partial = parse_amd_smi_gpu(amd_smi_gpus((FIXTURES / "amd-smi-metric-power-6.1-partial.json").read_text())[0])
    assert partial == {"power_w": 10.0}


def test_amd_smi_envelope_of_newer_releases():
    gpus = amd_smi_gpus(json.dumps({"gpu_data": [{"gpu": 0, "usage": {"gfx_activity": {"value": 5, "unit": "%"}},
                                                  "clock": {"gfx_0": "N/A"}}]}))
    assert parse_amd_smi_gpu(gpus[0]) == {"gpu_util_pct": 5.0}


def test_cli_backend_runs_without_shell_and_paces_itself():
    text = (OWN / "rocm-smi-5.x.json").read_text()
    calls = []

    def run(cmd, **kw):
        calls.append((cmd, kw))
        return types.SimpleNamespace(returncode=0, stdout=text, stderr="")

    b = RocmSmiBackend(torch.device("cuda", 1), run=run)
    assert b.sample()["power_w"] == 251.0
    cmd, kw = calls[0]
    assert cmd[0] == "rocm-smi" and "--json" in cmd and kw["timeout"] > 0 and "shell" not in kw
    b.ready_at = 1e18  # the tool has not had time to answer again
    assert b.sample() == {} and len(calls) == 1


def test_cli_backend_failure_raises_for_the_sampler_to_count():
    def run(cmd, **kw):
        return types.SimpleNamespace(returncode=2, stdout="", stderr="ERROR: GPU[0] : Unable to read")

    with pytest.raises(RuntimeError, match="exited with 2"):
        AmdSmiCliBackend(torch.device("cuda", 0), run=run).sample()


def test_cli_timeout_propagates():
    def run(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    with pytest.raises(subprocess.TimeoutExpired):
        RocmSmiBackend(torch.device("cuda", 0), run=run).sample()


def test_cpu_backend_for_real():
    b = CpuBackend()
    row = clean(b.sample())
    assert {"cpu_util_pct", "sys_cpu_util_pct", "proc_rss_mb", "sys_mem_used_mb"} <= set(row)
    assert row["proc_rss_mb"] > 10 and row["sys_mem_used_mb"] <= row["sys_mem_total_mb"]
    second = clean(b.sample())  # memory and system figures are read once a second, not every sample
    assert "cpu_util_pct" in second and "proc_rss_mb" not in second and "sys_mem_used_mb" not in second
    recorded, missing = b.metrics()
    assert ("energy_j" in recorded) != ("energy_j" in missing)


def _rapl(root, uj, max_uj=262_143_328_850):
    d = root / "intel-rapl:0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text("package-0\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    sub = root / "intel-rapl:0:0"
    sub.mkdir(exist_ok=True)
    (sub / "name").write_text("core\n")
    (sub / "energy_uj").write_text("5\n")
    (sub / "max_energy_range_uj").write_text("10\n")


def test_rapl_counts_package_energy_across_a_wraparound(tmp_path):
    _rapl(tmp_path, 1_000_000, max_uj=2_000_000)
    rapl = Rapl(tmp_path)
    assert rapl.available and len(rapl.domains) == 1  # the core sub-domain is inside the package
    assert rapl.joules() == pytest.approx(1.0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1500000\n")
    assert rapl.joules() == pytest.approx(1.5)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("250000\n")  # wrapped past 2 J
    assert rapl.joules() == pytest.approx(2.25)
    b = CpuBackend(powercap=tmp_path)
    assert "energy_j" in b.sample()


def test_rapl_absent_means_no_energy_key(tmp_path):
    b = CpuBackend(powercap=tmp_path / "none")
    assert "energy_j" not in b.sample()


def test_the_nvml_fake_matches_the_real_binding():
    """Every pynvml name the backend and the fake use exists in the real nvidia-ml-py module, so the
    fake cannot drift from the API it stands in for (no driver needed: nothing is called)."""
    real = pytest.importorskip("pynvml")
    fake = fake_pynvml()
    used = [n for n in vars(fake) if n.startswith(("nvml", "NVML"))]
    missing = [n for n in used if not hasattr(real, n)]
    assert not missing, missing
    assert real.NVML_CLOCK_SM == fake.NVML_CLOCK_SM and real.NVML_PCIE_UTIL_RX_BYTES == fake.NVML_PCIE_UTIL_RX_BYTES
    assert issubclass(real.NVMLError_NotSupported, real.NVMLError)
    assert real.nvmlClocksEventReasonSwPowerCap == 0x4 and real.nvmlClocksThrottleReasonHwThermalSlowdown == 0x40
