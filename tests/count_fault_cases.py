"""Count the bad-input and fault cases the tests cover, by kind (the figure in README.md).

    .venv/bin/python tests/count_fault_cases.py

Table cases come from the CASES lists of tests/test_safety_*.py (ids "KIND-what", each checked
with checksums of every file around it); the other fault tests are counted by their module.
"""

from __future__ import annotations

import collections
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KIND_TEXT = {"overwrite": "deletes or overwrites only its own files", "names": "names never become paths outside",
             "datafile": "data files never run code / bombs", "environment": "read-only, full or broken environment",
             "divergence": "non-finite training caught", "input": "bad flags and files: one line",
             "interrupt": "interruptions keep their promise", "telemetry": "vendor tools cleaned up"}
OTHER = {"test_faults_train": "train: NaN, --nan-policy skip, --max-steps resume, Ctrl-C, disk full, read-only",
         "test_telemetry_cleanup": "telemetry: hung/slow/failing vendor tools and writes",
         "test_bad_input": "bad flags and files (earlier table)"}


def main() -> None:
    by_kind: collections.Counter = collections.Counter()
    for path in sorted(HERE.glob("test_safety_*.py")):
        for case in importlib.import_module(path.stem).CASES:
            by_kind[case.id.split("-")[0]] += 1
    print(f"{'kind':<12} {'cases':>5}  what")
    for kind, n in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<12} {n:>5}  {KIND_TEXT.get(kind, '')}")
    print(f"{'all':<12} {sum(by_kind.values()):>5}  table cases, each with checksums of every file around it")
    for module, what in OTHER.items():
        if (HERE / f"{module}.py").is_file():
            source = (HERE / f"{module}.py").read_text()
            print(f"{module:<24} {source.count(chr(10) + 'def test_'):>3} tests  {what}")


if __name__ == "__main__":
    main()
