"""benchmarks/gpu_acceptance.sh: the script parses, and its CPU dry run passes (slow: run with -m slow)."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT.with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["python3", "-m", "py_compile", str(SCRIPT.with_suffix(".py"))], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_cpu_dry_run(tmp_path, request):
    # pyproject does not deselect slow tests by default: run this one only when -m names "slow"
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("several minutes: run with -m slow")
    out = tmp_path / "acc"
    p = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-dry-run"], capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((out / "results.json").read_text())
    status = {r["check"]: r["status"] for r in rows}
    assert status.pop("telemetry+energy") == "SKIP"
    every = {name for name, _ in _script().CHECKS} - {"telemetry+energy"}
    assert set(status) == every and set(status.values()) == {"PASS"}, status
    # one table row per check, and nothing written outside the output folder (checked: runs live there)
    assert sum(" | PASS | " in line for line in p.stdout.splitlines()) == len(every)
    assert (out / "runs" / "fast" / "metrics.jsonl").exists()
