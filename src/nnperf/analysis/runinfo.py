"""What a run directory says about itself: config, environment, FINAL and TEST results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from . import logs

# Config keys that describe a run at a glance, in the order a reader wants them.
HEADLINE = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "seed")


def _read(path: Path, parse) -> dict:
    try:
        return parse(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def config(src: logs.Source) -> dict:
    return _read(src.run_dir / "config.yaml", yaml.safe_load) if src.run_dir else {}


def env(src: logs.Source) -> dict:
    return _read(src.run_dir / "env.json", json.loads) if src.run_dir else {}


def test_results(src: logs.Source) -> dict[str, dict]:
    """{split: result} of the last `nnperf test` of each split of this run (test.json), if it ran."""
    kept = _read(src.run_dir / "test.json", json.loads) if src.run_dir else {}
    return {k: v for k, v in kept.items() if isinstance(v, dict) and "top1" in v}


def test_result(src: logs.Source) -> dict:
    """The headline TEST result: the test split's if measured, else the evaluation split's."""
    kept = test_results(src)
    return kept.get("test") or kept.get("val") or next(iter(kept.values()), {})


def final(mets: pd.DataFrame) -> dict:
    """The FINAL line's numbers: the validation row with the best top-1 (first such epoch)."""
    if not {"phase", "top1"} <= set(mets.columns):
        return {}
    val = mets[(mets["phase"] == "val") & mets["top1"].notna()]
    if val.empty:
        return {}
    best = val.loc[val["top1"].idxmax()]
    return {k: best[k] for k in ("top1", "top5", "loss", "epoch") if k in best and pd.notna(best[k])}


def differing_keys(configs: list[dict]) -> list[str]:
    """Config keys whose values are not the same in every run (a key one run lacks counts)."""
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
