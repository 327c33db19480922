"""Running a sweep: an Optuna study in a database that any number of `nnperf sweep` workers share.

Every trial of the study is created up front as a waiting trial (the grid points with their
settings, the rest empty for the sampler to fill), so workers on one machine or many take trials
from the database one at a time and the study ends with exactly `trials` trials: none lost, none
run twice. A trial is a normal run directory under the sweep folder. Pruning uses the validation
top-1 after each epoch. Ctrl-C saves the trial's position and queues it to resume; a worker that
died (no heartbeat for a while) has its trial failed and queued again by the next worker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

# Optuna 4.9 renamed the callback that re-queues a trial whose worker stopped beating.
RetryStale = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
              or optuna.storages.RetryFailedTrialCallback)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # nnperf prints its own line per trial

from .. import config as configs
from ..errors import Interrupted, UsageError
from ..track import StopRun
from .spec import Param, Spec

HEARTBEAT_S, GRACE_S = 30, 120
SLOT = "slot"  # user attr of the trials created up front
POINT = "grid_point"  # user attr: the trial's grid settings, as JSON


def quiet(function: Callable) -> Callable:
    """Run `function` without Optuna's warnings that mean nothing to a user of nnperf: the
    experimental features and deprecations it uses (heartbeats, retried trials), and that heartbeats
    are meant for Study.optimize (a sweep asks and tells). Only while it runs: the filters are not
    left in the process."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with warnings.catch_warnings():
            for category in (optuna.exceptions.ExperimentalWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"optuna\.|nnperf\.sweep")
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with "
                                                      "Study.optimize")
            return function(*args, **kwargs)

    return run


@quiet
def storage_for(url: str | None, folder: Path) -> RDBStorage:
    """SQLite in the sweep folder by default; any SQLAlchemy URL (postgresql://...) otherwise."""
    if url is None:
        folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(folder / 'study.db').resolve()}"
    try:
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                          failed_trial_callback=RetryStale(max_retry=3),
                          engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # noqa: BLE001 - any driver error becomes one line
        raise UsageError(f"--storage {_redacted(url)}: cannot open the database "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None


def _redacted(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


def _sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def _pruner(spec: Spec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    kind = p.get("type", "median")
    startup, warmup = int(p.get("startup_trials", 5)), int(p.get("warmup_epochs", 1))
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(float(p.get("percentile", 25.0)), n_startup_trials=startup,
                                               n_warmup_steps=warmup)
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)


@quiet
def open_study(spec: Spec, storage: RDBStorage) -> optuna.Study:
    """Create the study with all its waiting trials, or join it if it exists with the same spec."""
    try:
        study = optuna.create_study(study_name=spec.study, storage=storage, direction="maximize",
                                    sampler=_sampler(spec), pruner=_pruner(spec))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.study, storage=storage, sampler=_sampler(spec),
                                  pruner=_pruner(spec))
        theirs = _fingerprint_when_ready(study)
        if theirs != spec.fingerprint:
            raise UsageError(f"--study {spec.study}: a study of that name with a different search already "
                             "exists in this storage; choose another --study, or run its own spec") from None
        return study
    study.set_user_attr("spec", json.dumps(spec.raw, default=str))
    for i in range(spec.trials):
        point = spec.grid[i] if i < len(spec.grid) else {}
        study.enqueue_trial(point, user_attrs={SLOT: i, POINT: json.dumps(point)})
    # Set last: a worker that joins sees the fingerprint only once every trial is queued.
    study.set_user_attr("spec_fingerprint", spec.fingerprint)
    return study


def _fingerprint_when_ready(study: optuna.Study, wait_s: float = 60.0) -> str | None:
    """The study's spec fingerprint, waiting while the worker that created it is still queueing
    its trials (workers started together)."""
    deadline = time.monotonic() + wait_s
    while True:
        theirs = study.user_attrs.get("spec_fingerprint")
        if theirs is not None or time.monotonic() > deadline:
            return theirs
        time.sleep(0.5)


def _suggest(trial: optuna.Trial, spec: Spec) -> dict:
    """The trial's settings: its grid point (fixed when it was queued; suggesting a fixed parameter
    returns its value) and sampled `space` values."""
    point = json.loads(trial.user_attrs.get(POINT, "{}"))
    values = {}
    for key in point:
        choices = list(dict.fromkeys(p[key] for p in spec.grid if key in p))
        values[key] = trial.suggest_categorical(key, choices)
    for name, p in spec.space.items():
        values[name] = _draw(trial, p)
    return values


def _draw(trial: optuna.Trial, p: Param):
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, p.choices)
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1))
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.type == "log-float")


def _result_attrs(run_dir: Path) -> dict:
    """Time, energy and throughput of a trial's run from its metrics.jsonl (what exists of it)."""
    from ..fileio import read_jsonl

    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    train = [r for r in rows if r.get("phase") == "train"]
    seconds = sum(r.get("seconds") or 0 for r in rows if r.get("phase") in ("train", "val"))
    energy = [r["energy_j"] for r in rows if r.get("energy_j") is not None]
    images = sum(r.get("images") or 0 for r in train)
    train_s = sum(r.get("seconds") or 0 for r in train)
    return {"seconds": round(seconds, 2), "energy_j": round(sum(energy), 1) if energy else None,
            "images_per_s": round(images / train_s, 1) if train_s else None, "epochs": len(train),
            "run_dir": str(run_dir)}


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial: optuna.Trial):
    """Record the trial's heartbeat while it runs: Optuna does this only inside Study.optimize, and
    a sweep asks and tells. A worker that dies stops beating; the next worker fails and re-queues
    its trial after the grace period."""
    stop = threading.Event()
    trial_id = trial._trial_id  # noqa: SLF001 - the storage keys heartbeats by this id

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; never stop the trial
                storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="nnperf-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Pruned(StopRun):
    """The pruner stopped the trial (after its epoch was saved)."""


class Pruning:
    """A training sink (track.Sink): reports each validation top-1 to the trial, and ends a trial
    that the pruner stops. After the last epoch there is nothing left to save: the trial completes."""

    name = "sweep pruning"

    def __init__(self, trial: optuna.Trial, epochs: int):
        self.trial, self.epochs = trial, epochs

    def log(self, row: dict) -> None:
        val = row.get("val") if row["kind"] == "epoch" else None
        if val is None:
            return
        epoch = row["train"]["epoch"]
        self.trial.report(val["top1"], epoch)
        if epoch < self.epochs and self.trial.should_prune():
            raise Pruned(f"epoch {epoch}: val top-1 {val['top1']:.4f}")

    def close(self) -> None:
        pass


def run_trial(study: optuna.Study, trial: optuna.Trial, spec: Spec, folder: Path,
              log: Callable[[str], None]) -> None:
    from ..train import checkpoint, fit

    settings = {**spec.base, **_suggest(trial, spec)}
    name = _run_name(trial.number)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    run = _run_to_continue(study, trial)
    last = folder / run / "checkpoints" / "last.pt" if run else None
    resume = str(last) if last is not None and last.is_file() else None
    # A trial's run is always SWEEP_FOLDER/trialNNNN; overwrite replaces what a crash left of it.
    overrides = {"name": name, "out_dir": str(folder), "overwrite": True, "report": False}
    if resume:
        state = checkpoint.load(resume)
        cfg = checkpoint.resume_config(state, settings, {"resume": resume, "out_dir": str(folder), "name": run},
                                       resume)
    else:
        state, cfg = None, configs.build(settings, overrides)
    shown = json.dumps(_suggest_shown(settings, spec))
    log(f"trial {trial.number}: {shown}" + (f" (resuming {resume})" if resume else ""))

    run_dir = Path(cfg.out_dir) / cfg.name
    try:
        result = fit(cfg, state, log=lambda line: None, sinks=[Pruning(trial, cfg.epochs)]) if spec.nproc == 1 \
            else _fit_in_processes(cfg, spec.nproc, folder, trial.number)
    except Pruned as e:
        _set_attrs(trial, _result_attrs(run_dir))
        study.tell(trial, state=TrialState.PRUNED)
        log(f"trial {trial.number}: pruned at {e}")
        return
    except Interrupted as e:
        _set_attrs(trial, _result_attrs(run_dir))
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "resume_from": e.checkpoint})
        raise
    except UsageError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    attrs = _result_attrs(run_dir)
    best = result["best"]
    _set_attrs(trial, {**attrs, "best_epoch": best["epoch"] if best else None})
    if best is None:  # never evaluated (--eval-every beyond --epochs cannot happen; --max-steps can)
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number}: no validation result")
        return
    study.tell(trial, best["top1"])
    log(f"trial {trial.number}: top-1 {best['top1']:.4f} ({attrs['seconds']:.0f}s)")


def _fit_in_processes(cfg, nproc: int, folder: Path, number: int) -> dict:
    """A trial as `nnperf train --nproc N` under torchrun's launcher, its settings in a preset beside
    its run; unpruned, since the Optuna trial lives in this process and the run in N others."""
    import yaml

    from ..fileio import read_jsonl, write_text
    from ..train import launch

    preset = folder / f".trial{number:04d}.yaml"
    write_text(preset, yaml.safe_dump(configs.to_dict(cfg), sort_keys=False))
    code = launch.start(nproc, ["train", "--config", str(preset)], cfg)
    if code >= 128:
        raise Interrupted(code - 128, str(Path(cfg.out_dir) / cfg.name / "checkpoints" / "last.pt"))
    if code:
        raise UsageError(f"trial {number}: nnperf train --nproc {nproc} exited with status {code} (its lines above "
                         "say why)")
    rows = [r for r in read_jsonl(Path(cfg.out_dir) / cfg.name / "metrics.jsonl") if r.get("phase") == "val"]
    best = max(rows, key=lambda r: r["top1"], default=None)
    return {"best": {"epoch": best["epoch"], "top1": best["top1"]} if best else None}


def _run_name(number: int) -> str:
    return f"trial{number:04d}"


def _run_to_continue(study: optuna.Study, trial: optuna.Trial) -> str | None:
    """The run directory name (in this worker's sweep folder) of the stopped run this trial continues:
    one saved by Ctrl-C, or that of a dead worker's trial. Only the name is taken from the study:
    the recorded checkpoint path is another worker's (relative to its working directory, or on
    another machine), and a run resumed from a checkpoint outside the sweep folder would write, or
    continue another run, outside it."""
    recorded = trial.user_attrs.get("resume_from")
    if recorded is not None:
        run = Path(str(recorded)).parent.parent.name
        return run if re.fullmatch(r"trial\d+", run) else None
    frozen = study.get_trials(deepcopy=False)[trial.number]  # trials are listed by number
    # The trial right before this one in its series of retries is the one that died last.
    history = RetryStale.retry_history(frozen)
    return _run_name(history[-1]) if history else None


def _suggest_shown(settings: dict, spec: Spec) -> dict:
    keys = {k for p in spec.grid for k in p} | set(spec.space)
    return {k: settings[k] for k in settings if k in keys}


def _set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


@quiet
def work(spec: Spec, storage: RDBStorage, folder: Path, max_trials: int | None,
         log: Callable[[str], None]) -> int:
    """Take waiting trials until none is left (or `max_trials` were run here); returns how many ran."""
    study = open_study(spec, storage)
    ran = 0
    while max_trials is None or ran < max_trials:
        # Trials of workers that died (no heartbeat for GRACE_S) fail here and are queued again.
        optuna.storages.fail_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break
        trial = study.ask()
        if SLOT not in trial.user_attrs:
            # Another worker took the last waiting trial between our check and our ask; Optuna
            # then made a new one. Close it without running anything; it is not one of the sweep's.
            trial.set_user_attr("extra", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        with heartbeat(storage, trial):
            run_trial(study, trial, spec, folder, log)
        ran += 1
    return ran
