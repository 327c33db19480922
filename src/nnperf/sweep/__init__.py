"""Hyperparameter sweeps: Optuna studies over a YAML search space (`nnperf sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import folder as folders
from . import results, spec


def sweep(spec_path: str, trials: int | None, storage_url: str | None, study_name: str | None,
          out_dir: str | None, show_only: bool, log: Callable[[str], None] = print) -> str:
    """Run this worker's share of the study (or only show it); returns the results table."""
    from . import study as studies

    s = spec.load(spec_path, study_name)
    folder = Path(out_dir or Path("sweeps") / s.study)
    flag = "--out-dir" if out_dir else "sweep folder"
    unclaimed = folders.check(folder, s.study, flag)
    storage = studies.storage_for(storage_url, folder)
    if unclaimed:
        here = [st.study_name for st in storage.get_all_studies()] if storage_url is None else None
        folders.claim(folder, s.study, flag, here)
    study = studies.open_study(s, storage)
    if not show_only:
        ran = studies.work(s, storage, folder, trials, log)
        log(f"this worker ran {ran} trial(s)")
    frame = results.table(study, s)
    path = results.write(frame, folder)
    return results.show(frame) + f"\n\nwrote {path}"
