"""Bad input: one line naming the flag or file, exit status 2, no traceback, nothing damaged."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnperf import config as configs
from nnperf.errors import UsageError

from conftest import TINY


def _one_line_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--dataset", "svhn"], ["--dataset", "svhn", "cifar10", "fashion-mnist"]),
    (["--model", "vgg99"], ["--model", "vgg99", "small_cifar", "resnet18"]),
    (["--optimizer", "lion"], ["--optimizer", "lion", "nesterov", "sam"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "three"], ["--epochs", "three"]),
    (["--lr", "-1"], ["--lr"]),
    (["--lr", "1000"], ["--lr"]),
    (["--label-smoothing", "1.5"], ["--label-smoothing"]),
    (["--device", "cuda"], ["--device", "no cuda device"]),
    (["--device", "cuda:3"], ["--device", "cuda"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--val-split", "100000"], ["--val-split"]),
    (["--optimizer", "sam", "--precision", "fp16"], ["--optimizer sam", "fp16"]),
    (["--tta", "3"], ["--tta"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--lookahead-decay", "1.5"], ["--lookahead-decay"]),
    (["--decoupled", "--optimizer", "adam"], ["--decoupled"]),
    (["--muon-lr", "0"], ["--muon-lr"]),
    (["--flip", "sometimes"], ["--flip", "alternate"]),
    (["--pad-mode", "wrap"], ["--pad-mode", "reflect"]),
])
def test_bad_flags(run_cli, args, needles):
    _one_line_error(*run_cli("train", *TINY, "--epochs", "1", *args), *needles)
    assert not Path("runs").exists() or not any(Path("runs").iterdir())


RANGED = [f for f in configs.fields() if f.metadata["range"] is not None]


@pytest.mark.parametrize("f", RANGED, ids=[f.name for f in RANGED])
def test_each_range_accepts_its_bounds_and_names_the_flag_beyond_them(f):
    bounds, kind = f.metadata["range"], f.metadata["kind"]
    step = 1 if kind is int else 1e-6
    low = bounds.min if bounds.above is None else bounds.above + step
    high = bounds.max if bounds.below is None else bounds.below - step
    for ok in (low, high):
        assert getattr(configs.build({}, {f.name: kind(ok)}), f.name) == kind(ok)
    for bad in (low - step, high + step):
        with pytest.raises(UsageError) as info:
            configs.build({}, {f.name: kind(bad)})
        assert str(info.value) == f"{configs.flag_name(f.name)}: must be {bounds.text}, got {kind(bad)}"


def test_range_errors_read_as_before():
    # The wording users (and scripts that match it) already know.
    cases = {"epochs": (0, "between 1 and 100000"), "lr": (0.0, "above 0 and at most 100"),
             "momentum": (1.0, "in [0, 1)"), "weight_decay": (2e4, "0 to 10000"), "seed": (-1, "0 to 2**63-1"),
             "warmup": (-1, "0 to 10**9 steps"), "max_steps": (-1, "0 to 10**12"),
             "lookahead_decay": (1.0, "in (0, 1)"), "norm_lr_scale": (0.0, "above 0"), "tta": (3, "0, 1 or 2")}
    for name, (value, text) in cases.items():
        with pytest.raises(UsageError, match=re.escape(f"{configs.flag_name(name)}: must be {text}, got {value}")):
            configs.build({}, {name: value})


def test_a_setting_says_only_what_is_used():
    assert {k for f in configs.fields() for k in f.metadata} == {"help", "kind", "choices", "range"}


def test_unknown_flag_is_one_line(run_cli):
    _one_line_error(*run_cli("train", "--bogus", "1"), "--bogus")


def test_config_file_with_unknown_key(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    _one_line_error(*run_cli("train", "--config", "c.yaml"), "c.yaml", "epochz")


def test_missing_config_file(run_cli):
    _one_line_error(*run_cli("train", "--config", "nope.yaml"), "--config", "nope.yaml")


def test_data_folder_missing(run_cli):
    _one_line_error(*run_cli("train", "--dataset", "mnist", "--data", "nowhere", "--no-download"),
                    "--data nowhere", "train-images-idx3-ubyte", "--download")


def test_cifar_offline_says_how_to_get_it(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    line = _one_line_error(*run_cli("train", "--dataset", "cifar10", "--data", "empty", "--no-download"),
                           "--data empty", "CIFAR-10", "cifar-10-python.tar.gz", "--download")
    assert "data_batch_1" in line


def test_imagefolder_without_train_folder(run_cli, tmp_path):
    (tmp_path / "d" / "cat").mkdir(parents=True)
    _one_line_error(*run_cli("train", "--dataset", "imagefolder", "--data", "d"), "--data d", "train/")


def test_imagefolder_with_no_classes(run_cli, tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    _one_line_error(*run_cli("train", "--dataset", "imagefolder", "--data", "d"), "no class folders")


def test_imagefolder_with_an_empty_class(run_cli, tmp_path):
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "cat" / "a.png")
    _one_line_error(*run_cli("train", "--dataset", "imagefolder", "--data", "d"), "'dog'", "no images")


def test_imagefolder_with_an_unreadable_image(run_cli, tmp_path):
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "cat" / "a.png")
    (tmp_path / "d" / "train" / "cat" / "b.jpg").write_bytes(b"not a jpeg at all")
    _one_line_error(*run_cli("train", "--dataset", "imagefolder", "--data", "d"), "b.jpg", "unreadable image")


def test_imagefolder_without_test_split_needs_val_split(run_cli, tmp_path):
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "cat" / "a.png")
    _one_line_error(*run_cli("train", "--dataset", "imagefolder", "--data", "d"), "--val-split")


def _digest(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(run_cli, tmp_path):
    assert run_cli("train", *TINY, "--epochs", "1", "--name", "r")[0] == 0
    return tmp_path / "runs" / "r"


def test_existing_run_directory_is_refused_and_untouched(run_cli, trained):
    before = _digest(trained)
    _one_line_error(*run_cli("train", *TINY, "--epochs", "1", "--name", "r"), "already exists", "--overwrite",
                    "--resume")
    assert _digest(trained) == before
    assert run_cli("train", *TINY, "--epochs", "1", "--name", "r", "--overwrite")[0] == 0


def test_resume_from_another_model_or_dataset(run_cli, trained):
    ckpt = str(trained / "checkpoints" / "last.pt")
    before = _digest(trained)
    _one_line_error(*run_cli("train", "--resume", ckpt, "--model", "convnet3"), "--resume", "small_cifar",
                    "convnet3")
    _one_line_error(*run_cli("train", "--resume", ckpt, "--dataset", "mnist"), "--resume", "dataset")
    assert _digest(trained) == before


def test_resume_from_weights_of_another_shape(run_cli, trained):
    ckpt = trained / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"]["width"] = 16  # claims a wider model than the weights hold
    torch.save(state, trained / "checkpoints" / "other.pt")
    _one_line_error(*run_cli("train", "--resume", trained / "checkpoints" / "other.pt"), "--resume", "do not fit")


def test_resume_from_a_truncated_checkpoint(run_cli, trained):
    ckpt = trained / "checkpoints" / "last.pt"
    cut = trained / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _one_line_error(*run_cli("train", "--resume", cut), "--resume", "cut.pt", "not a readable checkpoint")


def test_resume_from_a_file_that_is_not_a_checkpoint(run_cli, trained, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "w.pt")
    _one_line_error(*run_cli("train", "--resume", tmp_path / "w.pt"), "not an nnperf checkpoint")
    (tmp_path / "t.txt").write_text("hello")
    _one_line_error(*run_cli("train", "--resume", tmp_path / "t.txt"), "not a readable checkpoint")
    _one_line_error(*run_cli("train", "--resume", tmp_path / "missing.pt"), "no such file")


def test_test_and_predict_bad_paths(run_cli, trained, tmp_path):
    _one_line_error(*run_cli("test", "runs/nothing"), "runs/nothing")
    _one_line_error(*run_cli("test", str(trained), "--split", "val"), "--split val")
    _one_line_error(*run_cli("predict", str(trained / "checkpoints" / "best.pt"), "missing.png"), "missing.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    _one_line_error(*run_cli("predict", str(trained / "checkpoints" / "best.pt"), "bad.png"), "bad.png")
