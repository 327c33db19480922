"""`nnperf devices`: the accelerators PyTorch sees, and per device which telemetry backends work and
which metrics each records (and why one is missing)."""

from __future__ import annotations

import torch

from .. import device as devices
from . import backends as registry


def visible() -> list[torch.device]:
    found = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        found += [torch.device("xpu", i) for i in range(torch.xpu.device_count())]
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        found.append(torch.device("mps"))
    return found + [torch.device("cpu")]


def report(dev: torch.device) -> list[str]:
    kind = "ROCm" if dev.type == "cuda" and torch.version.hip else dev.type.upper() if dev.type != "cpu" else "CPU"
    lines = [f"{dev} [{kind}] {devices.device_name(dev)}"]
    started = {b.name: b for b in registry.for_device(dev)}
    for name, _, (ok, why) in registry.candidates(dev):
        backend = started.get(name)
        if backend is None:
            state = why if not ok else "available, but another source serves this device"
            lines.append(f"  {name:9s} not used: {state}")
            continue
        try:
            recorded, missing = backend.metrics()
        except Exception as e:  # noqa: BLE001 - a broken source is a line of this report, not its end
            lines.append(f"  {name:9s} failed: {type(e).__name__}: {str(e)[:160]}")
            recorded, missing = None, {}
        else:
            lines.append(f"  {name:9s} records {', '.join(recorded) or 'nothing yet'}")
            lines += [f"  {'':9s}   no {metric}: {reason}" for metric, reason in sorted(missing.items())]
        finally:
            try:
                backend.close()
            except Exception:  # noqa: BLE001
                pass
    return lines


def describe() -> str:
    return "\n".join(line for dev in visible() for line in report(dev))
