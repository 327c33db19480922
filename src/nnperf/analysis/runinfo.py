"""What a run directory says about itself: config, environment, FINAL and TEST results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml

from .. import config as config_module
from . import logs

# Config keys that describe a run at a glance, in the order a reader wants them.
HEADLINE = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "seed")


MAX_NODES = 10_000  # values in a config or env file; a YAML alias bomb expands to billions


class _TooBig(Exception):
    pass


def _plain(value, budget: list[int]):
    """`value` as JSON-like data with text keys (YAML allows numbers, dates, null as keys), other
    objects as text; _TooBig past MAX_NODES values (aliases are counted each time they are used)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    if isinstance(value, dict):
        return {str(k): _plain(v, budget) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, budget) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _read(path: Path, parse) -> dict:
    """The file's mapping, or {} when it is missing, unreadable, not a mapping or absurdly large:
    these files come with copied runs and only decorate the output."""
    try:
        data = parse(path.read_text(encoding="utf-8"))
        return _plain(data, [MAX_NODES]) if isinstance(data, dict) else {}
    except (OSError, ValueError, yaml.YAMLError, RecursionError, _TooBig):
        return {}


def config(src: logs.Source) -> dict:
    """The run's config.yaml, settings renamed since it was written under their current names."""
    return config_module.upgraded(_read(src.run_dir / "config.yaml", yaml.safe_load)) if src.run_dir else {}


def env(src: logs.Source) -> dict:
    return _read(src.run_dir / "env.json", json.loads) if src.run_dir else {}


def _number(value) -> float | None:
    """A result from test.json: a finite number, else None (shown as '-')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def test_results(src: logs.Source) -> dict[str, dict]:
    """{split: result} of the last `nnperf test` of each split of this run (test.json), if it ran;
    top1/top5/loss that are not numbers are None."""
    kept = _read(src.run_dir / "test.json", json.loads) if src.run_dir else {}
    return {split: {**r, **{k: _number(r.get(k)) for k in ("top1", "top5", "loss")}}
            for split, r in kept.items() if isinstance(r, dict) and "top1" in r}


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
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def mean_mfu(mets: pd.DataFrame) -> float | None:
    """The mean model FLOPs utilisation of a run's training epochs, None where metrics.jsonl has none."""
    if "mfu" not in mets or "phase" not in mets:
        return None
    values = pd.to_numeric(mets.loc[mets["phase"] == "train", "mfu"], errors="coerce").dropna()
    return float(values.mean()) if len(values) else None
