"""The run directory: where it is, refusing to clobber anything that is not a run of ours, and the
files that describe a run (config.yaml, env.json; metrics.jsonl is a sink, track.MetricsFile)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from .. import config as configs
from ..config import TrainConfig
from ..errors import EnvError, UsageError
from ..fileio import clean_stale_temps, describe_os_error, read_jsonl, write_json, write_text
from ..names import safe_component

# What a run directory holds (DESIGN.md); --overwrite removes only a folder that looks like one.
RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl")


def default_name(cfg: TrainConfig) -> str:
    """dataset-model-time, safe as a folder name everywhere (tv:resnet50 -> tv-resnet50: a colon
    is refused by Windows and separates names from paths in TensorBoard's --logdir_spec)."""
    model = safe_component(cfg.model.replace(":", "-"))
    return f"{safe_component(cfg.dataset)}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A real folder (not a link) with checkpoints/ and nnperf's own config.yaml (every key a
    setting of nnperf's), or only the empty checkpoints/ that a run leaves when it stops while
    starting. A user's project folder with a config.yaml of its own is not one."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not (path / "checkpoints").is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    if entries == {"checkpoints"}:
        return not any((path / "checkpoints").iterdir())
    return _is_our_config(path / "config.yaml")


def _is_our_config(path: Path) -> bool:
    saved = _saved_config(path.parent)
    return saved is not None and {"model", "dataset"} <= set(saved) <= configs.known_names()


def _saved_config(run: Path) -> dict | None:
    """A run directory's config.yaml as a mapping, or None if it is missing or unreadable."""
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def target(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def check_new(cfg: TrainConfig) -> Path:
    """Where a new run goes; refuses (before anything is written) what create() must not touch."""
    path = target(cfg)
    out = Path(cfg.out_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out-dir {out}: {folder} is a file, not a folder; choose another --out-dir")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UsageError(f"--name {cfg.name}: {path} exists and is not a folder; choose another --name")
    if path.exists():
        if Path.cwd().resolve().is_relative_to(path.resolve()):
            raise UsageError(f"--overwrite: the current folder is inside {path}, the run it would replace; "
                             "run the command from outside it")
        if not cfg.overwrite:
            raise UsageError(f"--name: run directory {path} already exists; pass --overwrite to replace it, "
                             f"--resume {path}/checkpoints/last.pt to continue it, or another --name")
        if not is_run_dir(path):
            raise UsageError(f"--overwrite: {path} is not an nnperf run directory (no checkpoints/ and "
                             f"{', '.join(RUN_FILES)}); it is left alone: choose another --name")
    return path


def create(cfg: TrainConfig) -> Path:
    """A fresh run directory; an existing one is replaced only with --overwrite, and only if it is a run."""
    path = check_new(cfg)
    if path.exists():
        shutil.rmtree(path)
    try:
        (path / "checkpoints").mkdir(parents=True)
    except OSError as e:
        raise EnvError(f"--out-dir {cfg.out_dir}: cannot make the run directory {path} "
                       f"({describe_os_error(e)})") from None
    return path


def checkpoint_run(resume: str) -> Path | None:
    """RUN for a checkpoint at RUN/checkpoints/FILE of a real run directory, else None. Links are
    followed: the run is where the checkpoint really is. The path is kept as given where that
    names the same folder (relative paths stay relative)."""
    real = Path(resume).resolve()
    run = real.parent.parent
    if real.parent.name != "checkpoints" or not is_run_dir(run):
        return None
    given = Path(os.path.normpath(resume)).parent.parent
    return given if given.name not in ("", ".", "..") and given.resolve() == run else run


def config_name(run: Path) -> object:
    """The name in a run directory's config.yaml (None if unreadable)."""
    return (_saved_config(run) or {}).get("name")


def refuse_links(path: Path) -> None:
    """A run directory copied from elsewhere may hold links; writing through one (telemetry appended
    to a linked file, plots into a linked folder) would write outside the run, so refuse them."""
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            if os.path.islink(os.path.join(folder, name)):
                raise UsageError(f"{os.path.join(folder, name)}: is a link inside the run directory; nnperf writes "
                                 "only inside it: replace the link with a real file or folder")


def for_resume(cfg: TrainConfig) -> tuple[Path, bool]:
    """(run directory, whether it is new). A resume continues the checkpoint's own run when
    --out-dir/--name point at it; anywhere else must be a new folder (or an --overwrite-able run),
    so that resuming a copied checkpoint never writes over another run's files."""
    path = target(cfg)
    own = checkpoint_run(cfg.resume)
    if own is not None and path.resolve() == own.resolve():
        return path, False
    check_new(cfg)
    return path, True


def prepare_resume(path: Path) -> None:
    """The run directory of a resumed run exists, with checkpoints/; leftovers of a write that a
    crash interrupted are removed."""
    refuse_links(path)
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)


def clear_telemetry(path: Path) -> None:
    shutil.rmtree(path / "telemetry", ignore_errors=True)


def write_start_files(path: Path, cfg: TrainConfig, env: dict) -> None:
    """config.yaml (which reruns the run: without the resume, which belongs to this invocation
    only) and env.json; telemetry of earlier invocations removed first if --clear-telemetry says so."""
    if cfg.clear_telemetry:
        clear_telemetry(path)
    write_text(path / "config.yaml", configs.to_yaml(dataclasses.replace(cfg, resume=None)))
    write_json(path / "env.json", env)


def update_env(path: Path, extra: dict) -> None:
    env_file = path / "env.json"
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    write_json(env_file, {**env, **extra})


def metrics_kept(resume: str, path: Path, global_step: int, epoch: int, mid_epoch: bool) -> list[dict]:
    """The metrics.jsonl rows a run resumed from checkpoint `resume` keeps: rows written after the
    checkpoint belong to steps that will now run again, and so does the epoch row of an epoch that
    --max-steps cut short (`mid_epoch`)."""
    own = checkpoint_run(resume)
    metrics = (own if own is not None else path) / "metrics.jsonl"
    old = read_jsonl(metrics) if metrics.is_file() else []
    return [r for r in old if isinstance(r, dict) and isinstance(r.get("step", 0), int)
            and r.get("step", 0) <= global_step
            and not (mid_epoch and r.get("epoch") == epoch + 1 and r.get("phase") in ("train", "val"))]


def remove_if_unsaved(path: Path) -> None:
    """A run directory this invocation made, that failed before saving any checkpoint, holds
    nothing worth keeping: remove it rather than leave a half-made run behind."""
    if not any((path / "checkpoints").glob("*.pt")):
        shutil.rmtree(path, ignore_errors=True)
