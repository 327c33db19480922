"""`nnperf sweep`: spec checks, a SQLite sweep end to end, and two workers sharing a PostgreSQL study."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="nnperf sweep needs optuna")

BASE = {"dataset": "synthetic", "synthetic_size": 128, "image_size": 16, "width": 8, "batch_size": 32,
        "eval_batch_size": 64, "epochs": 2, "telemetry": False}


def _spec(tmp_path: Path, name: str = "s.yaml", **overrides) -> Path:
    body = {"study": "t", "base": BASE, "pruner": {"type": "none"},
            "grid": [{"optimizer": ["sgd", "adam"], "lr": [0.01, 0.05]}], **overrides}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("overrides,message", [
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "impossible range: low 0.1 is not below high 0.01"),
    ({"space": {"weight_decay": {"type": "log-float", "low": 0, "high": 0.1}}}, "log-float needs low > 0"),
    ({"space": {"momentum": {"type": "float", "low": 0.5, "high": 1.5}}}, "--momentum: must be in [0, 1)"),
    ({"base": {**BASE, "learning_rate": 0.1}}, "base: unknown setting(s) learning_rate"),
    ({"trials": 2}, "trials: must be a whole number from 4 to 100000 (the grid has 4 points), got 2"),
    ({"space": {"lr": {"type": "categorical", "choices": [0.1]}}}, "lr also in grid"),
])
def test_bad_specs_are_one_line(run_cli, tmp_path, overrides, message):
    code, _, err = run_cli("sweep", _spec(tmp_path, **overrides))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_sqlite_sweep_runs_every_trial_once_and_writes_the_table(run_cli, tmp_path):
    spec = _spec(tmp_path, trials=5, space={"weight_decay": {"type": "log-float", "low": 1e-5, "high": 1e-2}})
    code, out, err = run_cli("sweep", spec, "--trials", "3")
    assert code == 0, err
    assert "this worker ran 3 trial(s)" in out
    code, out, err = run_cli("sweep", spec)  # a second worker (or a restart) takes the rest
    assert code == 0, err
    assert "this worker ran 2 trial(s)" in out and "best per optimizer:" in out
    table = pd.read_csv(tmp_path / "sweeps" / "t" / "results.csv")
    assert list(table["trial"]) == [0, 1, 2, 3, 4] and set(table["state"]) == {"complete"}
    assert sorted(zip(table["optimizer"][:4], table["lr"][:4])) == [("adam", 0.01), ("adam", 0.05),
                                                                     ("sgd", 0.01), ("sgd", 0.05)]
    assert table["weight_decay"].between(1e-5, 1e-2).all() and table["best_top1"].between(0, 1).all()
    assert (table["seconds"] > 0).all()
    for n in range(5):
        assert (tmp_path / "sweeps" / "t" / f"trial{n:04d}" / "metrics.jsonl").exists()
    code, out, _ = run_cli("sweep", spec)
    assert "this worker ran 0 trial(s)" in out
    code, out, _ = run_cli("sweep", spec, "--show")
    assert code == 0 and "5 complete" in out


def test_a_study_name_cannot_be_reused_for_another_search(run_cli, tmp_path):
    first = _spec(tmp_path, "a.yaml", trials=4)
    assert run_cli("sweep", first, "--show")[0] == 0
    other = _spec(tmp_path, "b.yaml", grid=[{"optimizer": "sgd", "lr": [0.1, 0.2, 0.3, 0.4]}])
    code, _, err = run_cli("sweep", other, "--out-dir", "sweeps/t", "--show")
    assert code == 2 and "--study t: a study of that name with a different search already exists" in err


def test_unreachable_storage_is_one_line_without_the_password(run_cli, tmp_path):
    code, _, err = run_cli("sweep", _spec(tmp_path), "--storage", "postgresql://me:secret@127.0.0.1:1/none")
    assert code == 2 and err.startswith("nnperf sweep: error: --storage postgresql://me:***@127.0.0.1:1/none: "
                                        "cannot open the database")
    assert "secret" not in err and len(err.strip().splitlines()) == 1


def test_provided_optimizer_spec_covers_every_optimizer_three_ways():
    from nnperf.sweep import spec
    from nnperf.train.optim import OPTIMIZERS

    s = spec.load(Path(__file__).parents[1] / "configs" / "sweep-optimizers.yaml")
    per = pd.Series([p["optimizer"] for p in s.grid]).value_counts()
    # All but muon, which is made for the fast recipe (configs/cifar10-fast.yaml), not small_cifar.
    assert set(per.index) == set(OPTIMIZERS) - {"muon"}
    assert (per >= 3).all() and s.trials == len(s.grid)


def test_optuna_warnings_are_silenced_only_inside_the_sweep(tmp_path):
    import warnings

    from nnperf.sweep import spec as specs
    from nnperf.sweep import study as studies

    s = specs.load(_spec(tmp_path))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        storage = studies.storage_for(None, tmp_path / "sweeps" / "t")  # experimental heartbeats, retries
        studies.open_study(s, storage)
        assert warnings.filters == filters  # nothing left behind in the process
    assert [str(w.message) for w in seen if w.category in (optuna.exceptions.ExperimentalWarning,
                                                            FutureWarning)] == []
    # Importing the module changes no filter either (a fresh interpreter: here it is imported already).
    code = ("import warnings, optuna, torch, sqlalchemy, pandas, nnperf.config, nnperf.sweep.spec; "
            "before = list(warnings.filters); import nnperf.sweep.study; assert warnings.filters == before")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


# --- PostgreSQL: two workers, one study ----------------------------------------------------------------

def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on a Unix socket in a temporary folder; yields its URL."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install .[test])")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are absent (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="nnperf-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    os.chmod(root, 0o755)
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, text=True)  # noqa: E731
    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "nnperf")
    run(bindir / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-o", f"-k {root} -p {port} -c listen_addresses=''",
        "start")
    try:
        run(bindir / "createdb", "-h", root, "-p", port, "-U", "nnperf", "sweeps")
        yield f"postgresql+psycopg://nnperf@/sweeps?host={root}&port={port}"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_share_one_postgresql_study(postgres, tmp_path):
    spec = _spec(tmp_path, trials=6, space={"weight_decay": {"type": "log-float", "low": 1e-5, "high": 1e-2}},
                 base={**BASE, "epochs": 1})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nnperf", "sweep", str(spec), "--storage", postgres]
    # Create the study first so both workers join the same one, then run them side by side.
    first = subprocess.run(cmd + ["--show"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    workers = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    ran = [int(out.split("this worker ran ")[1].split(" ")[0]) for out, _ in outs]
    assert sum(ran) == 6 and min(ran) >= 1, ran  # split between them
    study = optuna.load_study(study_name="t", storage=postgres)
    trials = [t for t in study.get_trials() if not t.user_attrs.get("extra")]
    assert sorted(t.user_attrs["slot"] for t in trials) == list(range(6))  # none lost, none twice
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    runs = sorted(p.name for p in (tmp_path / "sweeps" / "t").glob("trial*"))
    assert runs == [f"trial{t.number:04d}" for t in sorted(trials, key=lambda t: t.number)]


def test_ctrl_c_saves_the_trial_and_the_next_sweep_resumes_it(run_cli, tmp_path, monkeypatch):
    import signal

    import nnperf.train as train_pkg

    real_fit = train_pkg.fit

    class CtrlC:  # a sink after the sweep's own
        name = "ctrl-c"

        def log(self, row):
            if row["kind"] == "epoch":
                signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during epoch 2

        def close(self):
            pass

    def fit_stopped_after_one_epoch(cfg, state=None, log=print, sinks=()):
        return real_fit(cfg, state, log, [*sinks, CtrlC()])

    spec = _spec(tmp_path, grid=[{"optimizer": "sgd", "lr": [0.01, 0.05]}])
    monkeypatch.setattr(train_pkg, "fit", fit_stopped_after_one_epoch)
    code, _, err = run_cli("sweep", spec)
    assert code == 130 and "queued; run the same nnperf sweep command again" in err
    monkeypatch.setattr(train_pkg, "fit", real_fit)
    code, out, err = run_cli("sweep", spec)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "sweeps" / "t" / "results.csv")
    assert list(table["state"]) == ["fail", "complete", "complete"]  # trial 0 stopped, then resumed as 2
    assert table.loc[2, "lr"] == 0.01 and table.loc[2, "epochs"] == 2
    rows = [json.loads(line) for line in (tmp_path / "sweeps" / "t" / "trial0000" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["epoch"] for r in rows if r["phase"] == "train"] == [1, 2]  # one run, continued


def test_median_pruning_stops_a_trial_that_trails_after_an_epoch_but_never_after_the_last(run_cli, tmp_path):
    spec = _spec(tmp_path, pruner={"type": "median", "startup_trials": 1, "warmup_epochs": 0},
                 base={**BASE, "epochs": 3, "optimizer": "sgd", "synthetic_size": 512},
                 grid=[{"lr": [0.05, 0.0001]}])  # the second trial barely moves
    code, out, err = run_cli("sweep", spec)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "sweeps" / "t" / "results.csv")
    assert list(table["state"]) == ["complete", "pruned"]
    assert table.loc[1, "epochs"] < 3 and "trial 1: pruned at epoch" in out


def test_missing_or_malformed_spec_file_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("sweep", "nope.yaml")
    assert code == 2 and err.strip() == "nnperf sweep: error: SPEC nope.yaml: no such file"
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli("sweep", "list.yaml")
    assert code == 2 and "SPEC list.yaml: expected a mapping" in err and len(err.strip().splitlines()) == 1


def test_a_dead_workers_trial_is_failed_and_run_again_by_the_next_worker(tmp_path, monkeypatch):
    import time

    from nnperf.sweep import spec as specs
    from nnperf.sweep import study as studies

    monkeypatch.setattr(studies, "HEARTBEAT_S", 1)
    monkeypatch.setattr(studies, "GRACE_S", 1)
    s = specs.load(_spec(tmp_path, grid=[{"optimizer": "sgd", "lr": [0.01, 0.05]}]))
    folder = tmp_path / "sweeps" / "t"
    storage = studies.storage_for(None, folder)
    study = studies.open_study(s, storage)
    dead = study.ask()  # a worker takes trial 0, beats once, then dies
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    ran = studies.work(s, storage, folder, None, lambda line: None)
    states = {t.number: t.state for t in study.get_trials()}
    assert ran == 2 and states[0] == optuna.trial.TrialState.FAIL
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["slot"] for t in done) == [0, 1]  # slot 0 ran again, as a new trial


def test_a_trial_can_be_a_two_process_run(run_cli, tmp_path):
    spec = _spec(tmp_path, nproc=2, grid=[{"optimizer": "sgd", "lr": [0.05]}])
    code, out, err = run_cli("sweep", spec)
    assert code == 0, err
    assert "this worker ran 1 trial(s)" in out
    run = tmp_path / "sweeps" / "t" / "trial0000"
    env = json.loads((run / "env.json").read_text())
    assert env["distributed"]["world_size"] == 2
    table = pd.read_csv(tmp_path / "sweeps" / "t" / "results.csv")
    assert table["best_top1"].between(0, 1).all() and list(table["state"]) == ["complete"]
