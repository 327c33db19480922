"""Telemetry reads the training GPU, and keeps reading it: per-backend timeouts for slow AMD tools that
query the training GPU alone, AMD temperatures sensor by sensor (MI300 has no edge sensor), and NVML
devices found by their CUDA UUID (NVML order is not CUDA order), MIG instances through their parent."""

import json
import time
import types
import uuid

import pytest
import torch

from nnperf.telemetry import Sampler
from nnperf.telemetry.backends import clean
from nnperf.telemetry.backends.amdsmi import AmdSmiBackend
from nnperf.telemetry.backends.nvml import NvmlBackend, nvml_uuids
from nnperf.telemetry.backends.rocm_smi import AmdSmiCliBackend, RocmSmiBackend

from conftest import SHARED
from fake_vendor import fake_amdsmi, fake_pynvml

FIXTURES = SHARED / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures not present")

# NVML (PCI bus) order: an A100 first, then an H100 that CUDA enumerates first (fastest first).
A100 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
H100 = "GPU-1234abcd-0000-1111-2222-333344445555"
MIG = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"


class CUuuid:
    """Stands in for torch._C._CUuuid: `bytes` holds the 16 raw bytes, str() the hex form, no prefix."""

    def __init__(self, text: str):
        self.bytes = uuid.UUID(text.split("-", 1)[1]).bytes

    def __str__(self):
        return str(uuid.UUID(bytes=self.bytes))


@pytest.fixture
def cuda_uuids(monkeypatch):
    """Fake torch.cuda at its API boundary: CUDA device i has the UUID set[i]."""
    order = []

    def props(i):
        return types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", uuid=order[i])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return order


# ---- 1. slow AMD tools: their own timeout, the training GPU only ----

class SlowBackend:
    """A tool-backed source whose one call takes `delay_s`, within its own `timeout_s`."""
    name, device = "slow", "cuda:0"

    def __init__(self, delay_s, timeout_s):
        self.delay_s, self.timeout_s, self.n = delay_s, timeout_s, 0

    def sample(self):
        self.n += 1
        if self.n == 1:
            time.sleep(self.delay_s)
        return {"gpu_util_pct": 50.0}

    def close(self):
        pass


def test_a_backend_slower_than_the_default_bound_is_judged_by_its_own_timeout(tmp_path):
    """rocm-smi often takes over 2 s on a multi-GPU node and has 5 s: the sampler's fixed 2 s bound
    disabled it as stuck."""
    warnings = []
    b = SlowBackend(delay_s=2.4, timeout_s=3.0)
    s = Sampler([b], tmp_path, interval_s=0.05, warn=warnings.append)
    s.start()
    deadline = time.monotonic() + 6
    while b.n < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.stop()
    assert warnings == [] and b.n >= 3
    assert any(json.loads(line)["backend"] == "slow" for line in (tmp_path / "idle.jsonl").read_text().splitlines())


def test_the_cli_backends_tell_the_sampler_their_timeout(tmp_path):
    for cls in (RocmSmiBackend, AmdSmiCliBackend):
        s = Sampler([cls(torch.device("cuda", 0), run=lambda *a, **k: None)], tmp_path, interval_s=0.5)
        assert s.workers[0].timeout_s > cls.timeout_s >= 5
    # A bound the caller sets is still the bound for all.
    assert Sampler([RocmSmiBackend(torch.device("cuda", 0))], tmp_path, timeout_s=0.3).workers[0].timeout_s == 0.3


def _runner(output):
    calls = []

    def run(cmd, **kw):
        calls.append((cmd, kw))
        return types.SimpleNamespace(returncode=0, stdout=output, stderr="")

    return run, calls


@needs_fixtures
def test_rocm_smi_queries_the_training_gpu_only(monkeypatch):
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "3")
    cards = json.loads((FIXTURES / "rocm-smi-5.7.1-mi100.json").read_text())
    # What `rocm-smi -d 3 ... --json` prints on that 6-GPU node: card3 alone, under its own name.
    run, calls = _runner(json.dumps({"card3": cards["card3"], "system": cards.get("system", {})}))
    b = RocmSmiBackend(torch.device("cuda", 0), run=run)
    row = b.sample()
    cmd, kw = calls[0]
    assert cmd[:3] == ["rocm-smi", "-d", "3"] and "--json" in cmd
    assert kw["timeout"] == b.timeout_s
    assert row["temp_c"] == float(cards["card3"]["Temperature (Sensor edge) (C)"])


@needs_fixtures
def test_amd_smi_queries_the_training_gpu_only(monkeypatch):
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    gpu = json.loads((FIXTURES / "amd-smi-metric-6.x-rx6600.json").read_text())[0]
    run, calls = _runner(json.dumps([{**gpu, "gpu": 5}]))  # `amd-smi metric -g 5 --json`
    row = AmdSmiCliBackend(torch.device("cuda", 1), run=run).sample()
    assert calls[0][0] == ["amd-smi", "metric", "-g", "5", "--json"]
    assert row["temp_c"] == 36 and row["sm_clock_mhz"] == 800


# ---- 2. AMD temperatures, sensor by sensor ----

def test_mi300_without_an_edge_sensor_still_reports_hotspot_and_memory():
    lib = fake_amdsmi("6.4", no_sensors=("EDGE",))
    b = AmdSmiBackend(torch.device("cuda", 0), lib=lib)
    row = b.sample()
    assert "temp_c" not in row and row["temp_hotspot_c"] == 74 and row["temp_mem_c"] == 68
    lib.temp_calls.clear()
    assert b.sample()["temp_hotspot_c"] == 74
    assert "EDGE" not in lib.temp_calls  # the missing sensor is not asked again
    recorded, missing = b.metrics()
    assert {"temp_hotspot_c", "temp_mem_c"} <= set(recorded) and "edge" in missing["temp_c"]


def test_a_gpu_with_no_temperature_sensor_at_all_drops_the_group_with_a_reason():
    b = AmdSmiBackend(torch.device("cuda", 0), lib=fake_amdsmi("6.0", no_sensors=("EDGE", "HOTSPOT", "VRAM")))
    row = b.sample()
    assert not {"temp_c", "temp_hotspot_c", "temp_mem_c"} & set(row) and "power_w" in row
    assert "temperature" not in b.readers
    _, missing = b.metrics()
    assert "edge" in missing["temp_c"] and "hotspot" in missing["temp_hotspot_c"]
    assert "NOT_SUPPORTED" in missing["temp_mem_c"]


# ---- 3. NVML: the training GPU by UUID, MIG through its parent ----

def test_nvml_uuid_spellings():
    assert nvml_uuids(CUuuid(H100)) == [H100, "MIG-" + H100[4:]]
    assert nvml_uuids(H100) == [H100] and nvml_uuids(MIG) == [MIG]
    assert nvml_uuids(uuid.UUID(A100[4:])) == [A100, "MIG-" + A100[4:]]
    assert nvml_uuids(None) == [] and nvml_uuids("") == []


@pytest.mark.parametrize("form", [CUuuid, str], ids=["torch-uuid-object", "GPU-string"])
def test_nvml_reads_the_card_cuda_trains_on_not_the_nvml_index(cuda_uuids, form):
    """CUDA enumerates the faster H100 first; NVML lists it second. Index 0 read the A100."""
    cuda_uuids += [form(H100), form(A100)]
    nv = fake_pynvml(uuids=(A100, H100))
    b = NvmlBackend(torch.device("cuda", 0), nv=nv)
    assert b.handle == ("handle", 1) and not b.mig
    assert NvmlBackend(torch.device("cuda", 1), nv=nv).handle == ("handle", 0)
    nv.device_calls.clear()
    row = b.sample()
    assert "mig" not in row and {h for _, h in nv.device_calls} == {("handle", 1)}


def test_integer_cuda_visible_devices_do_not_override_the_uuid(cuda_uuids, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # CUDA's own (fastest-first) numbering
    cuda_uuids.append(CUuuid(H100))
    assert NvmlBackend(torch.device("cuda", 0), nv=fake_pynvml(uuids=(A100, H100))).handle == ("handle", 1)


def test_without_a_uuid_the_index_mapping_is_used(monkeypatch):
    def no_props(i):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_props)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert NvmlBackend(torch.device("cuda", 0), nv=fake_pynvml()).handle == ("handle", 1)


def test_a_uuid_nvml_does_not_know_falls_back_to_the_index(cuda_uuids):
    cuda_uuids.append(CUuuid("GPU-00000000-0000-0000-0000-000000000000"))
    assert NvmlBackend(torch.device("cuda", 0), nv=fake_pynvml()).handle == ("handle", 0)


def test_a_mig_instance_reads_board_metrics_from_its_parent_gpu(cuda_uuids):
    cuda_uuids.append(CUuuid(MIG))  # torch prints the MIG instance's UUID without its prefix
    nv = fake_pynvml(uuids=(A100, H100), mig={MIG: 1})
    b = NvmlBackend(torch.device("cuda", 0), nv=nv)
    assert b.mig and b.handle == ("mig", MIG, 1)
    nv.device_calls.clear()
    row = clean(b.sample())
    assert row["mig"] is True
    assert row["power_w"] == 68.45 and row["temp_c"] == 64 and row["sm_clock_mhz"] == 1590 and "energy_j" in row
    assert "vram_used_mb" in row
    asked = dict(nv.device_calls)
    assert asked["nvmlDeviceGetPowerUsage"] == ("handle", 1)
    assert asked["nvmlDeviceGetTotalEnergyConsumption"] == ("handle", 1)
    assert asked["nvmlDeviceGetTemperature"] == ("handle", 1)
    assert asked["nvmlDeviceGetMemoryInfo"] == ("mig", MIG, 1)  # the instance's own memory
    _, missing = b.metrics()
    assert "gpu_util_pct" in missing  # a MIG instance reports no utilization


def test_the_mig_flag_reaches_the_row(cuda_uuids, tmp_path):
    cuda_uuids.append(CUuuid(MIG))
    s = Sampler([NvmlBackend(torch.device("cuda", 0), nv=fake_pynvml(mig={MIG: 0}))], tmp_path, interval_s=0.05).start()
    time.sleep(0.2)
    s.stop()
    rows = [json.loads(line) for line in (tmp_path / "idle.jsonl").read_text().splitlines()]
    assert rows and all(r["mig"] is True for r in rows)


# ---- 4. amdsmi: the training GPU by PCI address ----

# amdsmi (PCI) order: c1 then c2; HIP, after ROCR_VISIBLE_DEVICES=1,0 and HIP_VISIBLE_DEVICES=0,1
# compose, numbers the c2 card 0. The index mapping alone sees only HIP_VISIBLE_DEVICES: 0 -> c1.
AMD_BDFS = ("0000:c1:00.0", "0000:c2:00.0")


@pytest.fixture
def hip_pci(monkeypatch):
    """Fake torch.cuda on ROCm at its API boundary: HIP device i has the (domain, bus, device) set[i]."""
    order = []

    def props(i):
        domain, bus, device = order[i]
        return types.SimpleNamespace(name="AMD Instinct MI300X", pci_domain_id=domain, pci_bus_id=bus,
                                     pci_device_id=device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "1,0")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return order


def test_amdsmi_reads_the_card_hip_trains_on_by_its_pci_address(hip_pci):
    hip_pci += [(0, 0xC2, 0), (0, 0xC1, 0)]
    lib = fake_amdsmi("6.4", bdfs=AMD_BDFS)
    assert AmdSmiBackend(torch.device("cuda", 0), lib=lib).handle == "gpu1"
    assert AmdSmiBackend(torch.device("cuda", 1), lib=lib).handle == "gpu0"


def test_amdsmi_bdf_match_ignores_case_and_the_function_number(hip_pci):
    hip_pci.append((0, 0xC2, 0))
    assert AmdSmiBackend(torch.device("cuda", 0), lib=fake_amdsmi(bdfs=("0000:C1:00.0", "0000:C2:00.1"))).handle == "gpu1"


def test_amdsmi_without_pci_properties_falls_back_to_the_index(hip_pci, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="AMD Instinct MI100"))  # an older torch
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    assert AmdSmiBackend(torch.device("cuda", 0), lib=fake_amdsmi(bdfs=AMD_BDFS)).handle == "gpu1"


def test_amdsmi_pci_address_it_does_not_know_falls_back_to_the_index(hip_pci):
    hip_pci.append((0, 0x03, 0))
    assert AmdSmiBackend(torch.device("cuda", 0), lib=fake_amdsmi(bdfs=AMD_BDFS)).handle == "gpu0"
