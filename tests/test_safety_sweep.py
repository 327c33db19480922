"""`nnperf sweep`: names that become paths stay inside the sweep folder, and every spec value of the
wrong type or range is one line naming the spec file and key, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import safety
from safety import Case

pytest.importorskip("optuna", reason="nnperf sweep needs optuna")

SPEC = "../../spec.yaml"  # the harness runs from ROOT/work/here; setups write ROOT/spec.yaml
OUT = "work/here/sweeps/t/*"  # the default sweep folder of study t, relative to ROOT
# One tiny trial: a few seconds on a 2-core CPU.
BASE = {"dataset": "synthetic", "synthetic_size": 64, "image_size": 16, "width": 8, "batch_size": 32,
        "eval_batch_size": 64, "epochs": 1, "telemetry": False}
DEFAULT = {"study": "t", "base": BASE, "pruner": {"type": "none"}, "grid": [{"optimizer": "sgd", "lr": [0.05]}]}
DROP = object()  # a key left out of the spec


def spec(name: str = "spec.yaml", **overrides):
    """A setup that writes DEFAULT with `overrides` (DROP removes a key) to ROOT/name."""
    body = {k: v for k, v in {**DEFAULT, **overrides}.items() if v is not DROP}
    return lambda root: (root / name).write_text(yaml.safe_dump(body), encoding="utf-8")


def text(body: str | bytes):
    """A setup that writes ROOT/spec.yaml verbatim (YAML that safe_dump would not produce)."""
    data = body if isinstance(body, bytes) else body.encode()
    return lambda root: (root / "spec.yaml").write_bytes(data)


def space(**params):
    return spec(space=params, trials=3)


def _absolute_study(root: Path) -> None:
    spec(study=str(root / "elsewhere"))(root)


def _folder_of_other_study(root: Path) -> None:
    spec()(root)
    folder = root / "work" / "here" / "sweeps" / "shared"
    (folder / "trial0000" / "checkpoints").mkdir(parents=True)
    (folder / "trial0000" / "config.yaml").write_text("name: trial0000\n")
    (folder / "sweep.json").write_text(json.dumps({"study": "other"}))


def _folder_of_runs(root: Path) -> None:
    spec()(root)
    run = root / "runs" / "fashion-mnist-small_cifar-20240101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: mine\n")
    (root / "runs" / "trial0000" / "checkpoints").mkdir(parents=True)  # a run of the user's, by chance so named
    (root / "runs" / "trial0000" / "metrics.jsonl").write_text("{}\n")


def _legacy_folder_of_other_study(root: Path) -> None:
    """A sweep folder from before sweep.json: its SQLite database holds another study."""
    import optuna

    spec()(root)
    folder = root / "work" / "here" / "sweeps" / "old"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="other", storage=f"sqlite:///{folder / 'study.db'}")
    (folder / "trial0000" / "checkpoints").mkdir(parents=True)
    (folder / "trial0000" / "metrics.jsonl").write_text("{}\n")


def _unreadable_marker(root: Path) -> None:
    spec()(root)
    folder = root / "work" / "here" / "sweeps" / "t"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text("not json")


def _a_file_as_out_dir(root: Path) -> None:
    spec()(root)
    (root / "afile").write_text("keep me\n")


NAMES = [
    Case("names-spec-study-dotdot", ["sweep", SPEC], 2, ("spec.yaml: study", "'../../x'", "not a usable name"),
         setup=spec(study="../../x")),
    Case("names-spec-study-dot-dot-only", ["sweep", SPEC], 2, ("spec.yaml: study", "'..'"), setup=spec(study="..")),
    Case("names-spec-study-slash", ["sweep", SPEC], 2, ("spec.yaml: study", "'a/b'"), setup=spec(study="a/b")),
    Case("names-spec-study-newline", ["sweep", SPEC], 2, ("spec.yaml: study", "'a\\nb'"), setup=spec(study="a\nb")),
    Case("names-spec-study-absolute", ["sweep", SPEC], 2, ("spec.yaml: study", "elsewhere'", "not a usable name"),
         setup=_absolute_study),
    Case("names-spec-study-bad-even-with-a-good-flag", ["sweep", SPEC, "--study", "fine"], 2,
         ("spec.yaml: study", "'../x'"), setup=spec(study="../x")),
    Case("names-flag-study-dotdot", ["sweep", SPEC, "--study", "../../x"], 2, ("--study", "'../../x'"),
         setup=spec()),
    Case("names-flag-study-slash", ["sweep", SPEC, "--study", "a/b"], 2, ("--study", "'a/b'"), setup=spec()),
    Case("names-flag-study-newline", ["sweep", SPEC, "--study", "a\nb"], 2, ("--study", "'a\\nb'"), setup=spec()),
    Case("names-flag-study-absolute", ["sweep", SPEC, "--study", "/tmp/x"], 2, ("--study", "'/tmp/x'"), setup=spec()),
    Case("names-flag-study-empty", ["sweep", SPEC, "--study", ""], 2, ("--study", "''"), setup=spec()),
    # No study: the file name is the study name; "...yaml" would make it "..".
    Case("names-spec-file-name-as-study", ["sweep", "../../...yaml"], 2, ("...yaml: study", "file name", "'..'"),
         setup=spec("...yaml", study=DROP)),
    Case("names-base-out-dir", ["sweep", SPEC], 2, ("spec.yaml: base", "out_dir cannot be set in a sweep", "--out-dir"),
         setup=spec(base={**BASE, "out_dir": "../../x"})),
    Case("names-base-name", ["sweep", SPEC], 2, ("spec.yaml: base", "name cannot be set"),
         setup=spec(base={**BASE, "name": "../../x"})),
    Case("names-base-overwrite", ["sweep", SPEC], 2, ("spec.yaml: base", "overwrite cannot be set"),
         setup=spec(base={**BASE, "overwrite": True})),
    Case("names-base-resume", ["sweep", SPEC], 2, ("spec.yaml: base", "resume cannot be set"),
         setup=spec(base={**BASE, "resume": "../../x/checkpoints/last.pt"})),
    Case("names-grid-out-dir", ["sweep", SPEC], 2, ("spec.yaml: grid point 0", "out_dir cannot be set"),
         setup=spec(grid=[{"lr": 0.05, "out_dir": ["../../a", "../../b"]}])),
    Case("names-space-name", ["sweep", SPEC], 2, ("spec.yaml: space.name", "name cannot be set"),
         setup=space(name={"type": "categorical", "choices": ["../../a", "b"]})),
    Case("names-out-dir-of-another-study", ["sweep", SPEC, "--out-dir", "sweeps/shared"], 2,
         ("--out-dir sweeps/shared", "study 'other'", "choose another --out-dir"), setup=_folder_of_other_study),
    Case("names-out-dir-of-runs", ["sweep", SPEC, "--out-dir", "../../runs"], 2,
         ("--out-dir ../../runs", "not a sweep's", "fashion-mnist-small_cifar-20240101-000000"),
         setup=_folder_of_runs),
    Case("names-out-dir-of-another-study-before-the-marker", ["sweep", SPEC, "--out-dir", "sweeps/old"], 2,
         ("--out-dir sweeps/old", "study 'other'"), setup=_legacy_folder_of_other_study),
]

INPUT = [
    Case("input-spec-not-utf8", ["sweep", SPEC], 2, ("spec.yaml", "UTF-8"), setup=text(b"study: t\nseed: \xff\xfe\n")),
    Case("input-spec-unknown-keys-of-mixed-types", ["sweep", SPEC], 2, ("spec.yaml", "unknown key(s) 1, colour"),
         setup=text("study: t\ncolour: red\n1: one\n")),
    Case("input-study-number", ["sweep", SPEC], 2, ("spec.yaml: study", "a value of type int"), setup=spec(study=7)),
    Case("input-seed-text", ["sweep", SPEC], 2, ("spec.yaml: seed", "whole number", "'abc'"), setup=spec(seed="abc")),
    Case("input-seed-negative", ["sweep", SPEC], 2, ("spec.yaml: seed", "from 0 to 4294967295"), setup=spec(seed=-1)),
    Case("input-seed-float", ["sweep", SPEC], 2, ("spec.yaml: seed", "1.5"), setup=spec(seed=1.5)),
    Case("input-seed-bool", ["sweep", SPEC], 2, ("spec.yaml: seed", "True"), setup=spec(seed=True)),
    Case("input-seed-huge", ["sweep", SPEC], 2, ("spec.yaml: seed",), setup=spec(seed=2**40)),
    Case("input-trials-negative", ["sweep", SPEC], 2, ("spec.yaml: trials", "whole number", "-3"),
         setup=spec(trials=-3)),
    Case("input-trials-float", ["sweep", SPEC], 2, ("spec.yaml: trials", "4.5"), setup=spec(trials=4.5)),
    Case("input-trials-text", ["sweep", SPEC], 2, ("spec.yaml: trials", "'many'"), setup=spec(trials="many")),
    Case("input-trials-inf", ["sweep", SPEC], 2, ("spec.yaml: trials", "inf"), setup=spec(trials=float("inf"))),
    Case("input-trials-bool", ["sweep", SPEC], 2, ("spec.yaml: trials", "True"), setup=spec(trials=True)),
    Case("input-trials-huge", ["sweep", SPEC], 2, ("spec.yaml: trials", "100000"), setup=spec(trials=10**9)),
    Case("input-sampler-unknown", ["sweep", SPEC], 2, ("spec.yaml: sampler", "'grid'", "tpe or random"),
         setup=spec(sampler="grid")),
    Case("input-sampler-list", ["sweep", SPEC], 2, ("spec.yaml: sampler",), setup=spec(sampler=["tpe"])),
    Case("input-metric", ["sweep", SPEC], 2, ("spec.yaml: metric", "top1"), setup=spec(metric="loss")),
    Case("input-pruner-percentile-500", ["sweep", SPEC], 2, ("spec.yaml: pruner.percentile", "0 to 100", "500"),
         setup=spec(pruner={"type": "percentile", "percentile": 500})),
    Case("input-pruner-percentile-nan", ["sweep", SPEC], 2, ("spec.yaml: pruner.percentile", "nan"),
         setup=spec(pruner={"type": "percentile", "percentile": float("nan")})),
    Case("input-pruner-percentile-text", ["sweep", SPEC], 2, ("spec.yaml: pruner.percentile", "'half'"),
         setup=spec(pruner={"type": "percentile", "percentile": "half"})),
    Case("input-pruner-startup-trials-text", ["sweep", SPEC], 2, ("spec.yaml: pruner.startup_trials", "'x'"),
         setup=spec(pruner={"type": "median", "startup_trials": "x"})),
    Case("input-pruner-startup-trials-negative", ["sweep", SPEC], 2, ("spec.yaml: pruner.startup_trials", "-1"),
         setup=spec(pruner={"type": "median", "startup_trials": -1})),
    Case("input-pruner-warmup-epochs-float", ["sweep", SPEC], 2, ("spec.yaml: pruner.warmup_epochs", "1.5"),
         setup=spec(pruner={"type": "median", "warmup_epochs": 1.5})),
    Case("input-pruner-warmup-steps-is-not-a-key", ["sweep", SPEC], 2,
         ("spec.yaml: pruner", "unknown key(s) warmup_steps", "warmup_epochs"),
         setup=spec(pruner={"type": "median", "warmup_steps": 2})),
    Case("input-pruner-type-unknown", ["sweep", SPEC], 2, ("spec.yaml: pruner.type", "'hyperband'", "median"),
         setup=spec(pruner={"type": "hyperband"})),
    Case("input-pruner-type-list", ["sweep", SPEC], 2, ("spec.yaml: pruner.type",),
         setup=spec(pruner={"type": ["median"]})),
    Case("input-pruner-not-a-mapping", ["sweep", SPEC], 2, ("spec.yaml: pruner", "mapping"), setup=spec(pruner="none")),
    Case("input-base-not-a-mapping", ["sweep", SPEC], 2, ("spec.yaml: base", "mapping"), setup=spec(base=["a"])),
    Case("input-base-wrong-type", ["sweep", SPEC], 2, ("spec.yaml: base", "--epochs", "'three'"),
         setup=spec(base={**BASE, "epochs": "three"})),
    Case("input-base-inf", ["sweep", SPEC], 2, ("spec.yaml: base", "--weight-decay", "finite"),
         setup=spec(base={**BASE, "weight_decay": float("inf")})),
    Case("input-base-nan", ["sweep", SPEC], 2, ("spec.yaml: base", "--lr"),
         setup=spec(base={**BASE, "lr": float("nan")})),
    Case("input-grid-not-a-list", ["sweep", SPEC], 2, ("spec.yaml: grid", "list of mappings"),
         setup=spec(grid={"lr": 0.1})),
    Case("input-grid-empty-values", ["sweep", SPEC], 2, ("spec.yaml: grid[0]", "empty list"),
         setup=spec(grid=[{"lr": []}])),
    Case("input-grid-too-many-points", ["sweep", SPEC], 2, ("spec.yaml: grid", "more than 100000 points"),
         setup=spec(grid=[{"lr": [0.01 + i / 1e4 for i in range(1000)], "momentum": [i / 1e3 for i in range(1000)]}])),
    Case("input-grid-inf", ["sweep", SPEC], 2, ("spec.yaml: grid point 0", "--weight-decay"),
         setup=spec(grid=[{"weight_decay": [float("inf")]}])),
    Case("input-space-not-a-mapping", ["sweep", SPEC], 2, ("spec.yaml: space", "mapping"), setup=spec(space=["lr"])),
    Case("input-space-type-unknown", ["sweep", SPEC], 2, ("spec.yaml: space.momentum", "needs type"),
         setup=space(momentum={"type": "normal", "low": 0, "high": 0.9})),
    Case("input-space-type-list", ["sweep", SPEC], 2, ("spec.yaml: space.momentum", "needs type"),
         setup=space(momentum={"type": ["float"], "low": 0, "high": 0.9})),
    Case("input-space-low-text", ["sweep", SPEC], 2, ("spec.yaml: space.momentum", "finite numbers", "'a'"),
         setup=space(momentum={"type": "float", "low": "a", "high": 0.9})),
    Case("input-space-high-inf", ["sweep", SPEC], 2, ("spec.yaml: space.weight_decay", "finite numbers", "inf"),
         setup=space(weight_decay={"type": "float", "low": 0, "high": float("inf")})),
    Case("input-space-low-nan", ["sweep", SPEC], 2, ("spec.yaml: space.weight_decay", "finite numbers", "nan"),
         setup=space(weight_decay={"type": "log-float", "low": float("nan"), "high": 0.1})),
    Case("input-space-step-text", ["sweep", SPEC], 2, ("spec.yaml: space.batch_size", "step 'x'"),
         setup=space(batch_size={"type": "int", "low": 32, "high": 64, "step": "x"})),
    Case("input-space-step-not-whole-for-int", ["sweep", SPEC], 2, ("spec.yaml: space.batch_size", "step 0.5"),
         setup=space(batch_size={"type": "int", "low": 32, "high": 64, "step": 0.5})),
    Case("input-space-step-negative", ["sweep", SPEC], 2, ("spec.yaml: space.momentum", "step -0.1"),
         setup=space(momentum={"type": "float", "low": 0, "high": 0.9, "step": -0.1})),
    Case("input-space-step-on-log-float", ["sweep", SPEC], 2, ("spec.yaml: space.weight_decay", "unknown key(s) step"),
         setup=space(weight_decay={"type": "log-float", "low": 1e-5, "high": 1e-2, "step": 1e-3})),
    Case("input-space-choices-a-string", ["sweep", SPEC], 2, ("spec.yaml: space.schedule", "non-empty choices list"),
         setup=space(schedule={"type": "categorical", "choices": "cosine"})),
    Case("input-space-choices-nested", ["sweep", SPEC], 2, ("spec.yaml: space.schedule", "choice ['cosine']"),
         setup=space(schedule={"type": "categorical", "choices": [["cosine"]]})),
    Case("input-space-float-for-a-whole-number", ["sweep", SPEC], 2, ("spec.yaml: space.epochs", "type: int"),
         setup=space(epochs={"type": "float", "low": 1, "high": 3})),
    Case("input-space-number-for-text", ["sweep", SPEC], 2, ("spec.yaml: space.schedule", "type: categorical"),
         setup=space(schedule={"type": "int", "low": 1, "high": 3})),
    Case("input-flag-out-dir-empty", ["sweep", SPEC, "--out-dir", ""], 2, ("--out-dir", "must name a folder"),
         setup=spec()),
    Case("input-out-dir-is-a-file", ["sweep", SPEC, "--out-dir", "../../afile"], 2,
         ("--out-dir ../../afile", "is a file"), setup=_a_file_as_out_dir),
    Case("input-sweep-marker-unreadable", ["sweep", SPEC], 2, ("sweep folder sweeps/t", "sweep.json is unreadable"),
         setup=_unreadable_marker),
]


@pytest.mark.parametrize("case", NAMES + INPUT, ids=lambda c: c.id)
def test_sweep_refuses_before_writing(run_cli, tmp_path, case):
    safety.check(run_cli, tmp_path, case)  # nothing at all was created or changed


# --- what a sweep that runs writes ------------------------------------------------------------------

def _study_waiting_on_a_checkpoint_elsewhere(root: Path) -> None:
    """A study whose queued trial says it resumes a checkpoint outside the sweep folder (recorded by a
    worker elsewhere, or edited in a shared database), and a real run there that must stay untouched."""
    from nnperf import cli
    from nnperf.sweep import folder as folders
    from nnperf.sweep import spec as specs
    from nnperf.sweep import study as studies

    spec()(root)
    elsewhere = root / "elsewhere"
    assert cli.main(["train", "--dataset", "synthetic", "--synthetic-size", "64", "--image-size", "16", "--width", "8",
                     "--batch-size", "32", "--epochs", "1", "--no-telemetry", "--out-dir", str(elsewhere),
                     "--name", "trial0000"]) == 0
    s = specs.load(root / "spec.yaml")
    folder = root / "work" / "here" / "sweeps" / "t"
    storage = studies.storage_for(None, folder)
    folders.claim(folder, s.study, "sweep folder", [])
    study = studies.open_study(s, storage)
    trial = study.ask()
    study.tell(trial, state=studies.TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs,
                                                  "resume_from": str(elsewhere / "trial0000/checkpoints/last.pt")})


RUNS = [
    # The study name and trial numbers make the folders: everything lands in sweeps/t.
    Case("names-trials-stay-in-the-sweep-folder", ["sweep", SPEC], 0, ("this worker ran 1 trial(s)",),
         may_change=(OUT,), setup=spec()),
    Case("names-trials-stay-in-out-dir", ["sweep", SPEC, "--out-dir", "../../mine", "--study", "u"], 0,
         ("this worker ran 1 trial(s)",), may_change=("mine/*",), setup=spec()),
    Case("names-resumed-trial-stays-in-the-sweep-folder", ["sweep", SPEC], 0, ("this worker ran 1 trial(s)",),
         may_change=(OUT,), setup=_study_waiting_on_a_checkpoint_elsewhere),
]


@pytest.mark.parametrize("case", RUNS, ids=lambda c: c.id)
def test_sweep_writes_only_its_folder(run_cli, tmp_path, case):
    safety.check(run_cli, tmp_path, case)
    folder = tmp_path / ("mine" if "out-dir" in case.id else "work/here/sweeps/t")
    made = sorted(p.name for p in folder.iterdir())
    assert set(made) <= {"sweep.json", "study.db", "results.csv", "trial0000", "trial0001"}, made
    assert {"sweep.json", "results.csv"} <= set(made)
    assert json.loads((folder / "sweep.json").read_text()) == {"study": "u" if "out-dir" in case.id else "t"}


def _lone_results(root: Path) -> None:
    spec()(root)
    (root / "o5").mkdir()
    (root / "o5" / "results.csv").write_text("mine\n")


OVERWRITE = [
    Case("overwrite-sweep-folder-with-a-lone-results-csv", ["sweep", SPEC, "--out-dir", "../../o5"], 2,
         ("--out-dir", "not a sweep's", "results.csv"), setup=_lone_results),
]


@pytest.mark.parametrize("case", OVERWRITE, ids=lambda c: c.id)
def test_sweep_leaves_other_folders_alone(run_cli, tmp_path, case):
    safety.check(run_cli, tmp_path, case)


CASES = NAMES + INPUT + RUNS + OVERWRITE  # for tests/count_fault_cases.py
