"""`nnperf train`, `test` and `predict` under bad names, bad files, divergence, interruptions and a
failing disk: one line, the right exit status, and no file touched that was not theirs (tests/safety.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import safety
from conftest import TINY
from nnperf import cli
from safety import Case

TINY1 = [*TINY, "--epochs", "1", "--no-telemetry"]
RUNS = ["--out-dir", "../../runs"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One tiny trained run (6 steps, 1 epoch), copied into each case's folder."""
    root = tmp_path_factory.mktemp("template")
    old, cache = os.getcwd(), os.environ.get("NNPERF_CACHE")
    os.chdir(root)
    os.environ["NNPERF_CACHE"] = str(root / "cache")
    try:
        assert cli.main(["train", *TINY1, "--name", "a"]) == 0
    finally:
        os.chdir(old)
        os.environ.pop("NNPERF_CACHE") if cache is None else os.environ.__setitem__("NNPERF_CACHE", cache)
    return root / "runs" / "a"


TEMPLATE: list[Path] = []  # the module's trained run, for the setups below


@pytest.fixture(autouse=True)
def _template_for_setups(template):
    TEMPLATE[:] = [template]


def runs(*names: str):
    """setup: copy the template run to ROOT/runs/NAME for each name."""
    def setup(root: Path) -> None:
        for name in names:
            shutil.copytree(TEMPLATE[0], root / "runs" / name)
    return setup


def both(*setups):
    def setup(root: Path) -> None:
        for s in setups:
            s(root)
    return setup


def write(rel: str, content: bytes | str):
    def setup(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def copy_checkpoint(src: str, dst: str, edit=None):
    """setup: copy ROOT/src to ROOT/dst, changing the loaded state with `edit` first."""
    def setup(root: Path) -> None:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        if edit is None:
            shutil.copy(root / src, root / dst)
            return
        state = torch.load(root / src, weights_only=True)
        edit(state)
        torch.save(state, root / dst)
    return setup


def link(rel: str, target: str):
    def setup(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / target, root / rel)
    return setup


def image(rel: str):
    def setup(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), "red").save(root / rel)
    return setup


def _edit_env_data(**changes):
    def setup(root: Path) -> None:
        path = root / "runs/a/env.json"
        env = json.loads(path.read_text())
        env["data"].update(changes)
        path.write_text(json.dumps(env))
    return setup


A_LAST = "../../runs/a/checkpoints/last.pt"
CASES = [
    # --- a command deletes or overwrites only what it created or was told to replace ---
    Case("overwrite-name-dotdot", ["train", *TINY1, *RUNS, "--name", "..", "--overwrite"], 2,
         ("--name", "'..'", "not a usable name"), setup=runs("a")),
    Case("overwrite-name-dot", ["train", *TINY1, *RUNS, "--name", ".", "--overwrite"], 2,
         ("--name", "not a usable name"), setup=runs("a")),
    Case("overwrite-name-empty", ["train", *TINY1, *RUNS, "--name", "", "--overwrite"], 2,
         ("--name", "not a usable name"), setup=runs("a")),
    Case("overwrite-not-a-run-folder", ["train", *TINY1, *RUNS, "--name", "mine", "--overwrite"], 2,
         ("--overwrite", "not an nnperf run directory", "left alone"),
         setup=both(write("runs/mine/notes.txt", "my notes"), write("runs/mine/checkpoints/keep.txt", "x"))),
    Case("overwrite-link-to-a-run", ["train", *TINY1, *RUNS, "--name", "l", "--overwrite"], 2,
         ("--name l", "not a folder"), setup=both(runs("a"), link("runs/l", "runs/a"))),
    Case("overwrite-existing-run-without-flag", ["train", *TINY1, *RUNS, "--name", "a"], 2,
         ("already exists", "--overwrite"), setup=runs("a")),
    Case("overwrite-run-replaced-when-asked", ["train", *TINY1, *RUNS, "--name", "a", "--overwrite"], 0,
         may_change=("runs/a/*",), setup=runs("a")),
    Case("overwrite-resume-copy-onto-another-run", ["train", "--resume", "../../copy/last.pt", *RUNS, "--name", "b",
                                                    "--epochs", "2"], 2,
         ("--name", "runs/b already exists"), setup=both(runs("a", "b"), copy_checkpoint("runs/a/checkpoints/last.pt",
                                                                                         "copy/last.pt"))),
    Case("overwrite-resume-copy-onto-its-own-name", ["train", "--resume", "../../copy/last.pt", *RUNS,
                                                     "--epochs", "2"], 2,
         ("runs/a already exists",), setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/last.pt",
                                                                            "copy/last.pt"))),
    Case("overwrite-resume-copy-into-a-new-folder", ["train", "--resume", "../../copy/last.pt", *RUNS, "--name", "c",
                                                     "--epochs", "2"], 0,
         may_change=("runs/c/*",), setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/last.pt",
                                                                          "copy/last.pt"))),
    Case("overwrite-resume-elsewhere-onto-a-run", ["train", "--resume", A_LAST, "--name", "b", "--epochs", "2"], 2,
         ("runs/b already exists",), setup=runs("a", "b")),
    Case("overwrite-failed-resume-other-data", ["train", "--resume", A_LAST, "--synthetic-classes", "20",
                                                "--epochs", "2"], 2,
         ("--resume", "data differ", "20 classes now"), setup=runs("a")),
    Case("overwrite-failed-resume-max-steps-reached", ["train", "--resume", A_LAST, "--max-steps", "5"], 2,
         ("--max-steps 5", "already at step 6"), setup=runs("a")),
    Case("overwrite-test-does-not-create-run", ["test", "../../nowhere", "--checkpoint",
                                                "../../runs/a/checkpoints/best.pt"], 2,
         ("RUN_DIR", "no such run directory"), setup=runs("a")),
    Case("overwrite-resume-from-a-project-folder", ["train", "--resume", "../../proj/checkpoints/model.pt",
                                                    "--epochs", "2"], 0,
         may_change=("work/here/runs/a/*",),
         setup=both(runs("a"), write("proj/config.yaml", "my: own config\n"), write("proj/env.json", "{}"),
                    copy_checkpoint("runs/a/checkpoints/last.pt", "proj/checkpoints/model.pt"),
                    lambda root: shutil.rmtree(root / "runs"))),
    Case("overwrite-resume-through-a-link", ["train", "--resume", "../../a3/sub/link.pt", "--epochs", "2"], 0,
         may_change=("runs/a/*",),
         setup=both(runs("a"), write("a3/config.yaml", "model: mine\n"), link("a3/sub/link.pt",
                                                                                "runs/a/checkpoints/last.pt"))),
    Case("overwrite-test-into-a-folder-that-is-not-a-run", ["test", "../../t", "--checkpoint",
                                                            "../../runs/a/checkpoints/best.pt"], 2,
         ("RUN_DIR", "not an nnperf run directory"), setup=both(runs("a"), write("t/test.json", "[1, 2, 3]"))),
    Case("overwrite-resume-with-linked-telemetry", ["train", "--resume", A_LAST, "--epochs", "2", "--telemetry"], 2,
         ("telemetry", "is a link inside the run directory"),
         setup=both(runs("a"), write("victim/train_epoch.jsonl", "mine\n"), link("runs/a/telemetry", "victim"))),
    Case("overwrite-plot-into-a-linked-plots-folder", ["plot", "../../runs/a"], 2, ("plots", "is a link"),
         setup=both(runs("a"), write("victim/summary.csv", "mine\n"), link("runs/a/plots", "victim"))),
    Case("overwrite-failed-download-leaves-no-folders", ["train", *TINY1, *RUNS, "--dataset", "mnist", "--data",
                                                        "../../d", "--download"], 2, ("--download",)),
    Case("overwrite-data-show-out-inside-the-data", ["data", "show", "--dataset", "imagefolder", "--data",
                                                    "../../tree", "--out", "../../tree/train/cat/0.png"], 2,
         ("--out", "inside the dataset folder"), setup=both(image("tree/train/cat/0.png"),
                                                             image("tree/train/dog/0.png"))),
    Case("overwrite-from-inside-the-run-it-replaces", ["train", *TINY1, "--out-dir", "../..", "--name", "work",
                                                      "--overwrite"], 2,
         ("--overwrite", "current folder is inside"),
         setup=lambda root: shutil.copytree(TEMPLATE[0], root / "work", dirs_exist_ok=True)),
    Case("overwrite-foreign-checkpoint-dropped-into-a-run", ["train", "--resume", "../../runs/a/checkpoints/f.pt",
                                                             "--epochs", "2"], 2,
         ("--resume", "is of run 'other'", "copy it outside"),
         setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/last.pt", "runs/a/checkpoints/f.pt",
                                               lambda s: s["config"].update(name="other")))),
    Case("overwrite-test-with-another-runs-checkpoint", ["test", "../../runs/a", "--checkpoint",
                                                         "../../runs/b/checkpoints/best.pt"], 0, ("not kept",),
         setup=runs("a", "b")),
    Case("overwrite-resume-path-with-dotdot", ["train", "--resume", "../../runs/a/checkpoints/../checkpoints/last.pt",
                                               "--epochs", "2"], 0, may_change=("runs/a/*",), setup=runs("a")),
    # --- nothing is written outside the folder the user named ---
    Case("names-dotdot", ["train", *TINY1, *RUNS, "--name", "../../x"], 2, ("--name", "'../../x'", "letters")),
    Case("names-absolute", ["train", *TINY1, *RUNS, "--name", "/tmp/nnperf-escape"], 2, ("--name", "not a usable")),
    Case("names-slash", ["train", *TINY1, *RUNS, "--name", "a/b"], 2, ("--name", "'a/b'")),
    Case("names-newline", ["train", *TINY1, *RUNS, "--name", "a\nb"], 2, ("--name", "not a usable name")),
    Case("names-leading-dash-dot", ["train", *TINY1, *RUNS, "--name", ".hidden"], 2, ("--name", "not a usable")),
    Case("names-config-mapping", ["train", "--config", "../../c.yaml", *TINY1, *RUNS], 2,
         ("--config", "name", "expected str"), setup=write("c.yaml", "name: {a: 1}\n")),
    Case("names-config-dotdot", ["train", "--config", "../../c.yaml", *TINY1, *RUNS], 2,
         ("--name", "not a usable name"), setup=write("c.yaml", "name: ../../../escape\n")),
    Case("names-name-is-a-file", ["train", *TINY1, *RUNS, "--name", "f"], 2, ("--name f", "not a folder"),
         setup=write("runs/f", "a user's file")),
    Case("names-out-dir-is-a-file", ["train", *TINY1, "--out-dir", "../../file", "--name", "r"], 2,
         ("--out-dir", "is a file"), setup=write("file", "a user's file")),
    # --- every input gets a one-line error ---
    Case("input-config-not-utf8", ["train", "--config", "../../c.yaml"], 2, ("--config", "UTF-8"),
         setup=write("c.yaml", b"epochs: 1\nname: \xff\xfe\n")),
    Case("input-weight-decay-inf", ["train", *TINY1, *RUNS, "--weight-decay", "inf"], 2,
         ("--weight-decay", "finite")),
    Case("input-lr-nan", ["train", *TINY1, *RUNS, "--lr", "nan"], 2, ("--lr", "finite")),
    Case("input-config-momentum-inf", ["train", "--config", "../../c.yaml", *TINY1, *RUNS], 2,
         ("--momentum", "finite"), setup=write("c.yaml", "momentum: .inf\n")),
    Case("input-fast-model-too-small-images", ["train", *TINY1, *RUNS, "--model", "fast", "--image-size", "8"], 2,
         ("--model fast", "8x8", "--image-size")),
    Case("input-checkpoint-missing-keys", ["train", "--resume", "../../runs/a/checkpoints/bad.pt"], 2,
         ("--resume", "incomplete nnperf checkpoint", "'optimizer'"),
         setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/last.pt", "runs/a/checkpoints/bad.pt",
                                               lambda s: s.pop("optimizer")))),
    Case("input-checkpoint-bad-data", ["train", "--resume", "../../runs/a/checkpoints/bad.pt"], 2,
         ("incomplete nnperf checkpoint", "classes"),
         setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/last.pt", "runs/a/checkpoints/bad.pt",
                                               lambda s: s["data"].pop("classes")))),
    Case("input-predict-checkpoint-missing-keys", ["predict", "../../runs/a/checkpoints/bad.pt", "../../i.png"], 2,
         ("CHECKPOINT", "incomplete", "'shape'"),
         setup=both(runs("a"), image("i.png"),
                    copy_checkpoint("runs/a/checkpoints/best.pt", "runs/a/checkpoints/bad.pt",
                                    lambda s: s["data"].pop("shape")))),
    Case("input-test-checkpoint-missing-keys", ["test", "../../runs/a", "--checkpoint",
                                                "../../runs/a/checkpoints/bad.pt"], 2,
         ("--checkpoint", "incomplete"),
         setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/best.pt", "runs/a/checkpoints/bad.pt",
                                               lambda s: s.pop("model")))),
    Case("input-predict-bare-weights-garbage-config", ["predict", "../../runs/a/checkpoints/final_weights.pt",
                                                       "../../i.png"], 2,
         ("CHECKPOINT", "config.yaml or env.json"),
         setup=both(runs("a"), image("i.png"), write("runs/a/env.json", "[1, 2"))),
    Case("input-test-json-not-a-dict", ["test", "../../runs/a"], 0, ("TEST top1",),
         may_change=("runs/a/test.json",), setup=both(runs("a"), write("runs/a/test.json", "[1, 2]"))),
    Case("input-resume-config-garbage-name", ["train", "--resume", A_LAST, "--name", "x y"], 2,
         ("--name", "'x y'"), setup=runs("a")),
    Case("input-config-null", ["train", "--config", "../../c.yaml", *TINY1, *RUNS], 2,
         ("--config", "epochs", "needs a value"), setup=write("c.yaml", "epochs: null\n")),
    Case("input-seed-too-large", ["train", *TINY1, *RUNS, "--seed", str(10**30)], 2, ("--seed", "2**63-1")),
    Case("input-weight-decay-huge", ["train", *TINY1, *RUNS, "--weight-decay", "1e300"], 2, ("--weight-decay",)),
    Case("input-synthetic-size-huge", ["train", *TINY1, *RUNS, "--synthetic-size", str(10**12)], 2,
         ("--synthetic-size",)),
    *[Case(f"input-checkpoint-{what}", ["train", "--resume", "../../runs/a/checkpoints/bad.pt", "--epochs", "2"], 2,
           ("--resume", needle),
           setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/last.pt", "runs/a/checkpoints/bad.pt", edit)))
      for what, needle, edit in [
          ("optimizer-of-another-model", "optimizer cannot be restored",
           lambda s: s.update(optimizer={"state": {}, "param_groups": []})),
          ("schedule-empty", "schedule cannot be restored", lambda s: s.update(scheduler={})),
          ("rng-too-short", "random-number state cannot be restored",
           lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8))),
          ("best-not-numbers", "best epoch's figures", lambda s: s["best"].update(top1="high")),
          ("sums-not-numbers", "running sums", lambda s: s["sums"].update(loss="x")),
          ("unknown-augmentation", "augmentation", lambda s: s["data"]["augment"].update(bogus=1)),
          ("huge-shape", "data shape", lambda s: s["data"].update(shape=[3, 10**6, 10**6])),
          ("mean-not-numbers", "normalisation", lambda s: s["data"].update(mean=["a", "b", "c"])),
          ("config-value-wrong-type", "saved config is not valid", lambda s: s["config"].update(lr="fast")),
          ("position-beyond-the-epoch", "does not fit", lambda s: s.update(step=10**6)),
      ]],
    Case("input-test-checkpoint-of-another-model", ["test", "../../runs/a", "--checkpoint",
                                                    "../../runs/a/checkpoints/bad.pt"], 2,
         ("--checkpoint", "do not fit"),
         setup=both(runs("a"), copy_checkpoint("runs/a/checkpoints/best.pt", "runs/a/checkpoints/bad.pt",
                                               lambda s: s["config"].update(width=16)))),
    Case("input-predict-bare-weights-huge-shape", ["predict", "../../runs/a/checkpoints/final_weights.pt",
                                                   "../../i.png"], 2,
         ("CHECKPOINT", "data shape"),
         setup=both(runs("a"), image("i.png"), _edit_env_data(shape=[3, 10**6, 10**6]))),
    Case("input-out-dir-below-a-file", ["train", *TINY1, "--out-dir", "../../file/sub", "--name", "r"], 2,
         ("--out-dir", "is a file"), setup=write("file", "a user's file")),
    Case("input-config-is-a-folder", ["train", "--config", "../../cfg"], 2, ("--config", "not a regular file"),
         setup=lambda root: (root / "cfg").mkdir()),
    Case("input-predict-empty-checkpoint", ["predict", "../../empty.pt", "../../i.png"], 2,
         ("CHECKPOINT", "not a readable checkpoint"), setup=both(write("empty.pt", b""), image("i.png"))),
    Case("input-predict-fifo-image", ["predict", "../../runs/a/checkpoints/best.pt", "../../fifo"], 2,
         ("IMAGE", "not a regular file"), setup=both(runs("a"), lambda root: os.mkfifo(root / "fifo"))),
    # --- divergence is never silent ---
    Case("divergence-lr-100", ["train", *TINY, "--no-telemetry", *RUNS, "--name", "d", "--lr", "100", "--epochs", "3"],
         3, ("diverged at step", "--lr 100", "--nan-policy skip", "Nothing non-finite was saved"),
         may_change=("runs/d/*",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_safety_train(run_cli, tmp_path, case):
    safety.check(run_cli, tmp_path, case)
