"""Fine-tuning: the on-device resize, --init-from, --freeze-epochs, head and backbone learning rates."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision.transforms.v2 as T

from nnperf import config as configs
from nnperf import models
from nnperf.data import DataInfo
from nnperf.data.augment import Augment
from nnperf.data.loader import resize
from nnperf.train import checkpoint, finetune
from nnperf.train.optim import make_optimizer

from conftest import TINY, make_cifar_folder


@pytest.mark.parametrize("side,mode", [(64, "bilinear"), (48, "bicubic"), (20, "bilinear"), (12, "bicubic")])
def test_on_device_resize_equals_torchvision_resize(side, mode):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1), torch.tensor([60.0, 50.0, 70.0]).view(1, 3, 1, 1)
    mode_tv = T.InterpolationMode.BILINEAR if mode == "bilinear" else T.InterpolationMode.BICUBIC
    reference = (T.Resize((side, side), interpolation=mode_tv, antialias=True)(images.float()) - mean) / std
    ours = resize((images.float() - mean) / std, side, mode)  # normalised first: fewer pixels to touch
    assert ours.shape == (5, 3, side, side)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    channels_last = resize(((images.float() - mean) / std).contiguous(memory_format=torch.channels_last), side, mode)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


def test_data_info_keeps_the_input_size_and_reads_older_checkpoints():
    info = DataInfo(["a", "b"], (3, 32, 32), [0.5] * 3, [0.25] * 3, Augment(), "test", input_size=64,
                    interpolation="bicubic")
    assert info.input_shape == (3, 64, 64) and info.image_size == 64 and info.resize == (64, "bicubic")
    again = DataInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info and checkpoint.data_problem(info.to_dict()) is None
    older = {k: v for k, v in info.to_dict().items() if k not in ("input_size", "interpolation")}
    assert DataInfo.from_dict(older).input_shape == (3, 32, 32) and DataInfo.from_dict(older).resize is None
    assert checkpoint.data_problem({**info.to_dict(), "input_size": 2}) is not None
    assert checkpoint.data_problem({**info.to_dict(), "interpolation": "nearest-exact"}) is not None


def _state(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def test_image_size_resizes_cifar_batches_on_the_device(run_cli, tmp_path):
    make_cifar_folder(tmp_path / "c10")
    code, out, err = run_cli("train", "--dataset", "cifar10", "--data", str(tmp_path / "c10"), "--no-download", "--image-size", "40", "--model", "small_cifar",
                             "--width", "4", "--epochs", "1", "--batch-size", "16", "--out-dir", "runs", "--name", "big")
    assert code == 0, err
    state = _state(tmp_path / "runs" / "big")
    assert state["data"]["shape"] == [3, 32, 32] and state["data"]["input_size"] == 40
    env = json.loads((tmp_path / "runs" / "big" / "env.json").read_text())
    assert env["data"]["input_size"] == 40
    code, out, err = run_cli("test", str(tmp_path / "runs" / "big"))
    assert code == 0, err


def _train(run_cli, name, *extra):
    code, out, err = run_cli("train", *TINY, "--model", "small_cifar", "--epochs", "1", "--out-dir", "runs",
                             "--name", name, *extra)
    assert code == 0, err
    return out + err


def test_init_from_loads_an_earlier_run_with_a_new_head_and_freeze_keeps_the_backbone(run_cli, tmp_path):
    _train(run_cli, "first", "--synthetic-classes", "5")
    first = _state(tmp_path / "runs" / "first")["model"]
    log = _train(run_cli, "second", "--synthetic-classes", "10", "--init-from", "runs/first", "--freeze-epochs", "1")
    assert "--init-from runs/first/checkpoints/best.pt: loaded" in log and "head" in log
    second = _state(tmp_path / "runs" / "second")["model"]
    head = {"head.weight", "head.bias"}
    for key, value in first.items():
        if key in head:
            assert second[key].shape != value.shape  # 10 classes now
        elif key.endswith("num_batches_tracked"):
            continue
        else:  # the frozen epoch changed nothing of the backbone, BatchNorm statistics included
            torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)


def test_an_unfrozen_epoch_trains_the_backbone_and_resume_freezes_by_epoch(run_cli, tmp_path):
    _train(run_cli, "base")
    base = _state(tmp_path / "runs" / "base")["model"]
    conv = next(k for k in base if k.endswith("weight") and base[k].ndim == 4)
    # 192 images in batches of 32: --max-steps 6 stops after the frozen epoch; the resume trains epoch 2.
    code, out, err = run_cli("train", *TINY, "--model", "small_cifar", "--epochs", "2", "--out-dir", "runs",
                             "--name", "tuned", "--init-from", "runs/base", "--freeze-epochs", "1", "--max-steps", "6")
    assert code == 0, err
    torch.testing.assert_close(_state(tmp_path / "runs" / "tuned")["model"][conv], base[conv], rtol=0, atol=0)
    code, out, err = run_cli("train", "--resume", "runs/tuned/checkpoints/last.pt", "--max-steps", "12")
    assert code == 0, err
    final = _state(tmp_path / "runs" / "tuned")
    assert final["epoch"] == 2 and not torch.equal(final["model"][conv], base[conv])


def test_head_and_backbone_learning_rates_are_separate_groups():
    cfg = configs.build({}, {"head_lr": 0.5, "backbone_lr": 0.01, "lr": 0.1, "optimizer": "sgd"})
    model = models.build("small_cifar", 3, 10, 16, width=4)
    optimizer = make_optimizer(cfg, model, finetune.head_parameters(model))
    head_ids = {id(model.head.weight), id(model.head.bias)}
    for group in optimizer.param_groups:
        in_head = {id(p) in head_ids for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert group["lr"] == pytest.approx(0.5 if in_head.pop() else 0.01)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("args,expected", [
    (["--pretrained"], "--pretrained: --model small_cifar is one of nnperf's own models"),
    (["--pretrained", "w.pt", "--init-from", "runs/x"], "--init-from: cannot go with --pretrained"),
    (["--init-from", "nowhere"], "--init-from nowhere"),
    (["--head-lr", "0.1", "--optimizer", "muon"], "--head-lr/--backbone-lr"),
    (["--pretrained", "missing.pt"], "--pretrained missing.pt"),
])
def test_bad_fine_tuning_flags_are_one_line(run_cli, tmp_path, args, expected):
    code, out, err = run_cli("train", *TINY, "--model", "small_cifar", "--epochs", "1", "--out-dir", "runs",
                             "--name", "bad", *args)
    assert code == 2
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs" / "bad").exists()


def test_init_from_of_another_model_is_refused(run_cli, tmp_path):
    _train(run_cli, "small")
    code, out, err = run_cli("train", *TINY, "--model", "convnet3", "--epochs", "1", "--out-dir", "runs",
                             "--name", "other", "--init-from", "runs/small")
    assert code == 2 and "a checkpoint of --model small_cifar" in err and "--model convnet3" in err, err


def test_pretrained_file_is_matched_by_name(run_cli, tmp_path):
    torch.manual_seed(3)
    donor = models.build("small_cifar", 3, 7, 16, width=8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, tmp_path / "donor.pt")
    log = _train(run_cli, "from-file", "--pretrained", "donor.pt", "--freeze-epochs", "1")
    assert "--pretrained donor.pt: loaded" in log
    tuned = _state(tmp_path / "runs" / "from-file")["model"]
    conv = next(k for k, v in donor.state_dict().items() if v.ndim == 4)
    torch.testing.assert_close(tuned[conv], donor.state_dict()[conv], rtol=0, atol=0)


def test_yaml_pretrained_true_means_the_library_weights():
    assert configs.build({"pretrained": True}, {}).pretrained == finetune.LIBRARY_WEIGHTS
    assert configs.build({"pretrained": False}, {}).pretrained is None


def test_a_resume_refuses_other_starting_weights(run_cli, tmp_path):
    _train(run_cli, "base")
    code, out, err = run_cli("train", "--resume", "runs/base/checkpoints/last.pt", "--init-from", "runs/base")
    assert code == 2 and "--init-from: a resumed run continues from its checkpoint's weights" in err, err


def test_rgb_input_filters_of_a_file_are_summed_for_grey_data(run_cli, tmp_path):
    torch.manual_seed(5)
    donor = models.build("small_cifar", 3, 10, 16, width=8)
    torch.save(donor.state_dict(), tmp_path / "rgb.pt")
    _train(run_cli, "grey", "--synthetic-channels", "1", "--pretrained", "rgb.pt", "--freeze-epochs", "1")
    grey = _state(tmp_path / "runs" / "grey")["model"]
    first = next(k for k, v in donor.state_dict().items() if v.ndim == 4)
    torch.testing.assert_close(grey[first], donor.state_dict()[first].sum(dim=1, keepdim=True), rtol=0, atol=0)


def test_frozen_epochs_count_the_frozen_step_s_flops_and_doubtful_settings_warn(run_cli, tmp_path):
    log = _train(run_cli, "probe", "--freeze-epochs", "1")
    assert "warning: --freeze-epochs 1 without --pretrained or --init-from" in log
    assert "covers all 1 epochs" in log
    code, out, err = run_cli("train", *TINY, "--model", "small_cifar", "--epochs", "2", "--out-dir", "runs",
                             "--name", "two", "--freeze-epochs", "1")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    per_image = [r["model_flops_per_image"] for r in rows if r.get("phase") == "train"]
    assert len(per_image) == 2 and per_image[0] < per_image[1]  # no backbone gradients while frozen


def test_a_plain_pickle_is_refused_in_one_line_without_running(run_cli, tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Boom()}, protocol=4))
    code, out, err = run_cli("train", *TINY, "--model", "small_cifar", "--epochs", "1", "--out-dir", "runs",
                             "--name", "evil", "--pretrained", "evil.pt")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--pretrained evil.pt" in err, err
    assert not (tmp_path / "PWNED").exists()


def test_an_empty_init_from_is_refused_not_ignored(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--model", "small_cifar", "--epochs", "1", "--out-dir", "runs",
                             "--name", "empty", "--init-from", "")
    assert code == 2 and "--init-from: must name" in err, err
    assert not (tmp_path / "runs" / "empty").exists()
