"""AMD GPUs where only the command-line tools exist: `rocm-smi --json` and `amd-smi metric --json`.

Both run as a subprocess (no shell) in a session of their own with a timeout, and never more often than
they can answer; one that hangs is killed with its children (tool.py).
Key names of ROCm 5 and of ROCm 6.0/6.1+ are all understood; every value arrives as a string.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import torch

from .amdsmi import visible_index
from .base import first_number, index_of, number
from .tool import ToolRunner

MB = 1024 * 1024
ROCM_SMI_ARGS = ["--showuse", "--showmemuse", "--showpower", "--showtemp", "--showclocks", "--showmeminfo",
                 "vram", "--showenergycounter", "--json"]
CLOCK = re.compile(r"\((\d+(?:\.\d+)?)\s*Mhz\)", re.IGNORECASE)


def _clock(text) -> float | None:
    m = CLOCK.search(text) if isinstance(text, str) else None
    return float(m.group(1)) if m else None


def parse_rocm_smi_card(card: dict) -> dict:
    """One `cardN` object of `rocm-smi --json` (ROCm 5.x, 6.0, 6.1+) -> telemetry metrics."""
    row = {
        "gpu_util_pct": first_number(card, "GPU use (%)"),
        # Memory-controller activity: "GPU memory use (%)" until 6.0, split and renamed in 6.1.
        "mem_util_pct": first_number(card, "GPU Memory Read/Write Activity (%)", "GPU memory use (%)"),
        "power_w": first_number(card, "Current Socket Graphics Package Power (W)", "Average Graphics Package Power (W)"),
        "temp_c": first_number(card, "Temperature (Sensor edge) (C)"),
        "temp_hotspot_c": first_number(card, "Temperature (Sensor junction) (C)"),
        "temp_mem_c": first_number(card, "Temperature (Sensor memory) (C)"),
        "sm_clock_mhz": _clock(card.get("sclk clock speed:")),
        "mem_clock_mhz": _clock(card.get("mclk clock speed:")),
    }
    used, total = first_number(card, "VRAM Total Used Memory (B)"), first_number(card, "VRAM Total Memory (B)")
    row["vram_used_mb"] = used / MB if used is not None else None
    row["vram_total_mb"] = total / MB if total is not None else None
    energy_uj = first_number(card, "Accumulated Energy (uJ)")
    row["energy_j"] = energy_uj / 1e6 if energy_uj is not None else None
    return {k: v for k, v in row.items() if v is not None}


def rocm_smi_cards(text: str) -> list[dict]:
    """The `cardN` objects of a `rocm-smi --json` output, in card order."""
    data = json.loads(text.strip())
    cards = [(int(k[4:]), v) for k, v in data.items() if re.fullmatch(r"card\d+", k) and isinstance(v, dict)]
    return [v for _, v in sorted(cards)]


def _value(leaf) -> float | None:
    """An amd-smi leaf: {"value": ..., "unit": ...}, or "N/A" in place of the whole leaf."""
    return number(leaf.get("value")) if isinstance(leaf, dict) else number(leaf)


def parse_amd_smi_gpu(gpu: dict) -> dict:
    """One GPU object of `amd-smi metric --json` -> telemetry metrics."""
    usage, power = gpu.get("usage") or {}, gpu.get("power") or {}
    clock, temp = gpu.get("clock") or {}, gpu.get("temperature") or {}
    mem, energy = gpu.get("mem_usage") or {}, gpu.get("energy") or {}

    def clk(name):
        entry = clock.get(name)
        return _value(entry.get("clk")) if isinstance(entry, dict) else None

    row = {
        "gpu_util_pct": _value(usage.get("gfx_activity")), "mem_util_pct": _value(usage.get("umc_activity")),
        "power_w": next((v for v in (_value(power.get(k)) for k in (
            "socket_power", "current_socket_power", "average_socket_power")) if v is not None), None),
        "sm_clock_mhz": clk("gfx_0"), "mem_clock_mhz": clk("mem_0"),
        "temp_c": _value(temp.get("edge")), "temp_hotspot_c": _value(temp.get("hotspot")),
        "temp_mem_c": _value(temp.get("mem")),
        "vram_used_mb": _value(mem.get("used_vram")), "vram_total_mb": _value(mem.get("total_vram")),
        "energy_j": _value(energy.get("total_energy_consumption")),
    }
    return {k: v for k, v in row.items() if v is not None}


def amd_smi_gpus(text: str) -> list[dict]:
    data = json.loads(text.strip())
    if isinstance(data, dict):  # newer releases wrap the list
        data = data.get("gpu_data", [])
    return [g for g in data if isinstance(g, dict)]


class _CliBackend:
    """Runs a tool for the training GPU alone, parses that GPU out of its JSON, and paces itself to the
    tool's own speed. `timeout_s` bounds the tool, and tells the sampler how long a call may take before
    it is stuck: these tools often need over 2 s on a multi-GPU node."""

    name: str
    program: str
    timeout_s = 5.0
    may_hang = True  # a process per sample, which may not answer: its own thread, killed when stuck

    def __init__(self, device: torch.device | str, run=None):
        hip_index = index_of(torch.device(device))
        self.device = f"cuda:{hip_index}"
        self.index = visible_index(hip_index)
        self.tool = ToolRunner()
        self.run = run or self.tool  # run(command, timeout=...) -> a CompletedProcess; tests pass their own
        self.ready_at = 0.0

    @property
    def command(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type != "cuda":
            return False, f"{cls.program} serves ROCm (cuda) devices only"
        path = shutil.which(cls.program)
        return (True, path) if path else (False, f"{cls.program} is not on PATH")

    def parse(self, text: str) -> dict:
        raise NotImplementedError

    def sample(self) -> dict:
        now = time.monotonic()
        if now < self.ready_at:
            return {}  # the tool is slower than the sampling interval: skip this tick
        proc = self.run(self.command, timeout=self.timeout_s)
        took = time.monotonic() - now
        self.ready_at = now + 2 * took  # at most half of the time spent inside the tool
        if proc.returncode != 0:
            raise RuntimeError(f"{self.command[0]} exited with {proc.returncode}: {proc.stderr.strip()[:200]}")
        return self.parse(proc.stdout)

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        return sorted(self.sample()), {}

    def abandon(self) -> None:
        """The sampler gave up waiting (called from its thread): kill the tool and whatever it started."""
        self.tool.kill()

    def close(self) -> None:
        self.tool.kill()  # a call still in flight when sampling stops is not worth waiting for


class RocmSmiBackend(_CliBackend):
    name = program = "rocm-smi"

    @property
    def command(self) -> list[str]:
        # `-d N`: the training GPU only (the output still names it cardN), not every card of the node.
        return ["rocm-smi", "-d", str(self.index), *ROCM_SMI_ARGS]

    def parse(self, text: str) -> dict:
        return parse_rocm_smi_card(rocm_smi_card(text, self.index))


class AmdSmiCliBackend(_CliBackend):
    name = program = "amd-smi"

    @property
    def command(self) -> list[str]:
        # `-g N`: the training GPU only (its object keeps "gpu": N).
        return ["amd-smi", "metric", "-g", str(self.index), "--json"]

    def parse(self, text: str) -> dict:
        return parse_amd_smi_gpu(amd_smi_gpu(text, self.index))


def rocm_smi_card(text: str, index: int) -> dict:
    """GPU `index` of a `rocm-smi [-d index] --json` output: its `cardN` object, else the only card."""
    data = json.loads(text.strip())
    card = data.get(f"card{index}") if isinstance(data, dict) else None
    if isinstance(card, dict):
        return card
    cards = rocm_smi_cards(text)
    if len(cards) == 1:
        return cards[0]
    raise LookupError(f"rocm-smi reported no card{index}")


def amd_smi_gpu(text: str, index: int) -> dict:
    """GPU `index` of an `amd-smi metric [-g index] --json` output: the object with "gpu": index, else
    the only one."""
    gpus = amd_smi_gpus(text)
    for gpu in gpus:
        if number(gpu.get("gpu")) == index:
            return gpu
    if len(gpus) == 1:
        return gpus[0]
    raise LookupError(f"amd-smi reported no gpu {index}")
