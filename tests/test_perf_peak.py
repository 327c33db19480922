"""`nnperf peak`, its measurements and the per-device cache: nnperf.perf.peak and nnperf.perf.cache.

Timings run on tiny sizes (the default sweep would take seconds); figures are checked for being
positive, finite and plausible, never against a speed (the test machines are shared and noisy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nnperf.errors import UsageError
from nnperf.perf import cache, peak

CPU = torch.device("cpu")
TINY = peak.Plan(matmul_sizes=(64, 128), conv_shapes=((2, 4, 4, 8),), buffer_bytes=2**20, llc_bytes=None,
                 repeats=2, block_s=0.002, call_cap_s=0.5)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(peak, "default_plan", lambda dev: TINY)
    # One thread: on a busy machine two threads meeting at a barrier can make a tiny matmul a
    # hundred times slower than its arithmetic, and these checks are about units, not speed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plausible_flops(value: float) -> bool:
    return math.isfinite(value) and 1e8 <= value <= 1e18  # 0.1 GFLOP/s .. 1e6 TFLOP/s


def test_measure_gives_plausible_figures(tiny):
    result = peak.measure(CPU, ["fp32"])
    fp32 = result["dtypes"]["fp32"]
    assert _plausible_flops(fp32["matmul"]["flop_per_s"])
    assert fp32["matmul"]["size"] in TINY.matmul_sizes
    assert fp32["matmul"]["flop_per_s"] == max(fp32["matmul"]["by_size"].values())
    (conv,) = fp32["conv3x3"]
    assert conv["flop"] == 2 * 2 * 4 * 8 * 8 * 4 * 9
    assert conv["layout"] in ("nchw", "nhwc") and _plausible_flops(conv["flop_per_s"] * 10)  # tiny: slower
    bw = result["bandwidth"]
    assert bw["buffer_bytes"] == 2**20
    for k in ("copy_bytes_per_s", "triad_bytes_per_s"):
        assert math.isfinite(bw[k]) and 1e7 < bw[k] < 1e14
    assert result["seconds"] > 0
    assert peak.measure(CPU, ["fp32"], sizes=[48], bandwidth=False)["dtypes"]["fp32"]["matmul"]["size"] == 48


def test_a_dtype_that_fails_is_not_supported_here(tiny, monkeypatch):
    monkeypatch.setitem(peak.DTYPES, "bool", torch.bool)  # no matmul kernel for bool on the CPU
    figures = peak.measure_dtype(CPU, "bool", TINY)
    assert "fails" in figures["unsupported"] and "matmul" not in figures


def test_an_emulated_dtype_is_not_supported_here(monkeypatch):
    monkeypatch.setattr(peak, "_probe_rates", lambda dev, dtype, n, cap: (2e9, 80e9))
    why = peak.support(CPU, "fp16", TINY)
    assert "emulated" in why and "1/40" in why
    monkeypatch.setattr(peak, "_probe_rates", lambda dev, dtype, n, cap: (150e9, 80e9))
    assert peak.support(CPU, "bf16", TINY) is None


def test_cache_is_written_and_read_back(tiny, monkeypatch, tmp_path):
    first = peak.cached_or_measure(CPU, ["fp32"])
    path = Path(first["cache_file"])
    assert path.is_file() and path.is_relative_to(tmp_path / "cache" / "peak")
    assert first["dtypes"]["fp32"]["source"] == "measured" and first["bandwidth"]["source"] == "measured"

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(peak, "measure", no_measuring)
    again = peak.cached_or_measure(CPU, ["fp32"])
    assert again["dtypes"]["fp32"]["source"] == "cache"
    assert again["dtypes"]["fp32"]["matmul"] == first["dtypes"]["fp32"]["matmul"]
    assert again["dtypes"]["fp32"]["measured_at"] == first["dtypes"]["fp32"]["measured_at"]
    assert "cache, measured" in peak.format_table(again)


def test_refresh_and_other_dtypes_measure_only_what_is_needed(tiny, monkeypatch):
    peak.cached_or_measure(CPU, ["fp32"])
    asked = []
    real = peak.measure
    monkeypatch.setattr(peak, "measure", lambda dev, dtypes, **kw: asked.append((list(dtypes), kw["bandwidth"]))
                        or real(dev, dtypes, **kw))
    both = peak.cached_or_measure(CPU, ["fp32", "bf16"])
    assert asked == [(["bf16"], False)]
    assert both["dtypes"]["fp32"]["source"] == "cache" and both["dtypes"]["bf16"]["source"] == "measured"
    peak.cached_or_measure(CPU, ["bf16"], refresh=True)
    assert asked[-1] == (["bf16"], True)
    assert "fp32" in cache.get(peak.KIND, cache.device_key(CPU))["dtypes"]  # kept through the refresh


def test_corrupt_cache_is_ignored_with_one_warning(tiny, capsys):
    path = cache.path_for(peak.KIND, cache.device_key(CPU))
    path.parent.mkdir(parents=True)
    path.write_text('{"kind": "peak", "value": {"dtypes": {"fp3')  # torn by a crash
    result = peak.cached_or_measure(CPU, ["fp32"])
    assert result["dtypes"]["fp32"]["source"] == "measured"
    assert json.loads(path.read_text())["value"]["dtypes"]["fp32"]["matmul"]["flop_per_s"] > 0  # rewritten
    err = capsys.readouterr().err
    assert err.count("unreadable") == 1 and str(path) in err
    path.write_text(json.dumps({"key": {"name": "another"}, "value": {}}))
    assert cache.get(peak.KIND, cache.device_key(CPU)) is None


def test_unwritable_cache_means_no_caching_not_a_failure(tiny, monkeypatch, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NNPERF_CACHE", str(tmp_path / "a-file" / "cache"))  # a file in the way
    result = peak.cached_or_measure(CPU, ["fp32"])
    assert result["dtypes"]["fp32"]["matmul"]["flop_per_s"] > 0
    assert "cannot write" in capsys.readouterr().err
    assert cache.put("policy", {"name": "x"}, 1) is None


def test_cache_is_generic_and_keyed(monkeypatch, tmp_path):
    key = {"name": "GPU 9000", "torch": "9.9"}
    path = cache.put("policy", key, {"precision": "bf16", "channels_last": True})
    assert path.parent.name == "policy" and path.name.startswith("GPU_9000-")
    assert cache.get("policy", key) == {"precision": "bf16", "channels_last": True}
    assert cache.get("policy", {**key, "torch": "10.0"}) is None  # another torch: no figures
    assert cache.get_entry("policy", key)["written_at"] > 0
    with pytest.raises(ValueError):
        cache.path_for("../x", key)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NNPERF_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NNPERF_CACHE")
    assert cache.cache_dir() == tmp_path / "xdg" / "nnperf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "nnperf"


def test_device_key_of_the_cpu():
    key = cache.device_key(CPU)
    assert key["type"] == "cpu" and key["name"] and key["torch"] == torch.__version__
    assert key["threads"] == torch.get_num_threads()
    assert isinstance(key["isa"], list) and all(not f.startswith("sse") for f in key["isa"])


@pytest.mark.measured_peak
def test_peak_flops_measures_once_then_reads_the_cache(tiny, monkeypatch):
    assert not peak.is_cached(CPU, "fp32")
    value = peak.peak_flops(CPU, "fp32")
    assert value is not None and _plausible_flops(value) and peak.is_cached(CPU, "fp32")
    stored = cache.get(peak.KIND, cache.device_key(CPU))
    fp32 = stored["dtypes"]["fp32"]
    assert "quick" not in fp32 and sorted(fp32["matmul"]["by_size"], key=int) == [str(n) for n in TINY.matmul_sizes]
    assert value == max(fp32["matmul"]["flop_per_s"], fp32["conv3x3"][0]["flop_per_s"])
    monkeypatch.setattr(peak, "measure", lambda *a, **k: pytest.fail("measured although cached"))
    assert peak.peak_flops(CPU, "fp32") == value
    assert peak.peak_flops(CPU, "fp64") is None
    cache.put(peak.KIND, cache.device_key(CPU), {"dtypes": {"fp16": {"unsupported": "emulated"}, "bf16": {
        "matmul": {"flop_per_s": 1e11}, "conv3x3": [{"flop_per_s": 3e11}, {"flop_per_s": 2e11}]}}})
    assert peak.peak_flops(CPU, "fp16") is None
    assert peak.peak_flops(CPU, "bf16") == 3e11  # the faster of matmul and convolution


@pytest.mark.measured_peak
def test_a_quick_figure_of_an_older_cache_is_measured_again(tiny):
    cache.put(peak.KIND, cache.device_key(CPU), {"dtypes": {"fp32": {"matmul": {"flop_per_s": 1.0}, "quick": True}}})
    assert not peak.is_cached(CPU, "fp32")
    assert peak.peak_flops(CPU, "fp32") > 1.0  # the quick figure (under half the full one here) is not used
    assert "quick" not in cache.get(peak.KIND, cache.device_key(CPU))["dtypes"]["fp32"]


@pytest.mark.parametrize("name, units, expected", [
    ("NVIDIA H100 80GB HBM3", 132, "H100 SXM"), ("NVIDIA H100 PCIe", 114, "H100 PCIe"),
    ("NVIDIA H200", 132, "H200 SXM"), ("NVIDIA A100-SXM4-80GB", 108, "A100 SXM4 80GB"),
    ("NVIDIA L4", 58, "L4"), ("NVIDIA GeForce RTX 4090", 128, "GeForce RTX 4090"),
    ("AMD Instinct MI300X", 304, "Instinct MI300X"), ("AMD Instinct MI250X/MI250", 110, "Instinct MI250X (one GCD)"),
    ("AMD Instinct MI250X/MI250", 104, "Instinct MI250 (one GCD)"), ("NVIDIA H200", None, "H200 SXM"),
])
def test_vendor_spec_known_gpus(name, units, expected):
    spec = peak.vendor_spec(name, units)["spec"]
    assert spec["name"] == expected
    assert set(spec["tflops"]) >= {"fp32", "bf16", "fp16"} and spec["bandwidth_gbps"] > 0
    assert spec["tflops"]["bf16"] >= spec["tflops"]["fp32"]


def test_vendor_spec_unknown_or_partitioned():
    assert peak.vendor_spec("NVIDIA H100 80GB HBM3", 16)["spec"] is None  # a MIG slice
    assert "partition" in peak.vendor_spec("NVIDIA H100 80GB HBM3", 16)["why"]
    assert peak.vendor_spec("NVIDIA L40S", 142)["spec"] is None
    assert peak.vendor_spec("NVIDIA H200 NVL", 132)["spec"] is None
    assert "cpu" in peak.vendor_spec("AMD EPYC", None, "cpu")["why"]
    assert peak.vendor_spec("NVIDIA H100 80GB HBM3", 132)["spec"]["tflops"]["bf16"] == 989.5  # dense, not 1979


def test_table_with_a_datasheet_and_an_unsupported_dtype():
    result = {"device": "NVIDIA H200", "device_type": "cuda", "key": {"torch": "2.9"}, "cache_file": "c.json",
              "seconds": 3.0, **peak.vendor_spec("NVIDIA H200", 132),
              "dtypes": {"bf16": {"matmul": {"flop_per_s": 7.5e14, "size": 8192}, "source": "measured",
                                  "measured_at": 0, "conv3x3": [{"shape": [128, 64, 64, 32], "flop_per_s": 2e14,
                                                                 "layout": "nhwc"}]},
                         "fp16": {"unsupported": "why not", "source": "cache", "measured_at": 0}},
              "bandwidth": {"copy_bytes_per_s": 4e12, "triad_bytes_per_s": 4.2e12, "buffer_bytes": 2**29,
                            "llc_bytes": 50 * 2**20, "source": "cache", "measured_at": 0}}
    text = peak.format_table(result)
    assert "750.0 TFLOP/s (n=8192), 76% of datasheet" in text
    assert "989.5 TFLOP/s" in text and "4800 GB/s (triad reaches 88%)" in text
    assert "fp16: not supported here: why not" in text and "--refresh" in text
    assert "conv3x3 128x64->64 32x32" in text and "200.0 TFLOP/s (nhwc)" in text


def test_parse_dtypes():
    assert peak.parse_dtypes(" FP32,bf16,fp32 ") == ["fp32", "bf16"]
    for bad in ("fp64", "fp32,,x", ""):
        with pytest.raises(UsageError, match="--dtypes"):
            peak.parse_dtypes(bad)


def test_llc_size_parsing():
    assert peak._parse_size("32768K\n") == 32 * 2**20
    assert peak._parse_size("2 MiB") == 2 * 2**20
    llc = peak.llc_bytes()
    assert llc is None or llc >= 2**16


def test_cli_peak_writes_json_and_reads_the_cache(tiny, run_cli, tmp_path):
    code, out, err = run_cli("peak", "--device", "cpu", "--dtypes", "fp32", "--json", "peak.json")
    assert code == 0, err
    assert "matmul, best size" in out and "measured now" in out and "wrote peak.json" in out
    figures = json.loads((tmp_path / "peak.json").read_text())
    assert figures["dtypes"]["fp32"]["matmul"]["flop_per_s"] > 0 and figures["bandwidth"]["copy_bytes_per_s"] > 0
    assert figures["spec"] is None and figures["key"]["type"] == "cpu"
    code, out, _ = run_cli("peak", "--device", "cpu", "--dtypes", "fp32")
    assert code == 0 and "cache, measured" in out and "--refresh" in out
    code, out, _ = run_cli("peak", "--device", "cpu", "--dtypes", "fp32", "--refresh")
    assert code == 0 and "cache, measured" not in out


@pytest.mark.parametrize("args, needle", [(["--dtypes", "fp64"], "--dtypes fp64: unknown dtype 'fp64'"),
                                          (["--json", "."], "--json .: is a folder"),
                                          (["--device", "tpu"], "--device")])
def test_cli_peak_bad_input_is_one_line(run_cli, args, needle):
    code, out, err = run_cli("peak", *args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not list(Path(".").glob("**/*.json"))  # nothing measured, nothing written
