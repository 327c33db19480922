"""Use a trained run: re-evaluate a checkpoint (`nnperf test`) and classify image files (`predict`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from .. import config as configs
from .. import device as devices
from ..data import DataInfo
from ..data.formats import bomb_warnings_silenced, open_image
from ..data.loader import resize
from ..errors import UsageError
from . import checkpoint
from .build import SPLITS, build_model, choose_hardware, eval_batches, load_splits
from .step import evaluate


def _run_checkpoint(run_dir: str, path: str | None) -> tuple[str, str]:
    if path:
        return path, "--checkpoint"
    best = Path(run_dir) / "checkpoints" / "best.pt"
    if not Path(run_dir).is_dir():
        raise UsageError(f"RUN_DIR {run_dir}: no such run directory")
    if not best.is_file():
        raise UsageError(f"RUN_DIR {run_dir}: no checkpoints/best.pt (did its first epoch finish?)")
    return str(best), "RUN_DIR"


def test(run_dir: str, checkpoint_path: str | None = None, split: str | None = None,
         device: str | None = None, tta: int | None = None) -> dict:
    """Evaluate a checkpoint (default: the run's best) on a split (default: the one training used)."""
    path, flag = _run_checkpoint(run_dir, checkpoint_path)
    state = checkpoint.load(path, flag)
    cfg = configs.build(checkpoint.config_of(state, path, flag),
                        {"resume": None, **({"device": device} if device else {}),
                         **({"tta": tta} if tta is not None else {})})
    info = DataInfo.from_dict(state["data"])
    split = split or info.eval_split
    if split not in SPLITS:
        raise UsageError(f"--split: unknown split '{split}' (choose from {', '.join(SPLITS)})")
    hw = choose_hardware(cfg)
    model = build_model(cfg, info, hw.dev, hw.channels_last)
    checkpoint.state_matches_model(state, model, path, flag)
    model.load_state_dict(state["model"])
    batches = eval_batches(cfg, load_splits(cfg).get(split), info, hw.dev, hw.channels_last)
    return {"split": split, "checkpoint": path, **evaluate(model, batches, hw.dev, hw.precision, cfg.tta)}


def _load_for_predict(path: str) -> tuple[configs.TrainConfig, DataInfo, dict]:
    """(config, data info, weights) from a full checkpoint, or from final_weights.pt beside its run's
    config.yaml and env.json."""
    p = Path(path)
    raw = checkpoint.read(path, "CHECKPOINT")
    if isinstance(raw, dict) and raw.get("format") == checkpoint.FORMAT:
        raw = checkpoint.load(path, "CHECKPOINT")  # the same checks as train --resume
        cfg = configs.build(checkpoint.config_of(raw, path, "CHECKPOINT"), {"resume": None})
        return cfg, DataInfo.from_dict(raw["data"]), raw["model"]
    run = p.parent.parent
    env = run / "env.json"
    if not (run / "config.yaml").is_file() or not env.is_file():
        raise UsageError(f"CHECKPOINT {path}: bare weights without the run's config.yaml and env.json beside "
                         "checkpoints/; use checkpoints/best.pt")
    try:
        cfg = configs.build(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")), {"resume": None})
        info = json.loads(env.read_text(encoding="utf-8"))["data"]
    except (ValueError, yaml.YAMLError, TypeError, KeyError, UsageError) as e:
        raise UsageError(f"CHECKPOINT {path}: the run's config.yaml or env.json is unreadable "
                         f"({type(e).__name__}); use checkpoints/best.pt") from None
    problem = checkpoint.data_problem(info) or (None if isinstance(raw, dict) else "the file holds no weights")
    if problem:
        raise UsageError(f"CHECKPOINT {path}: {problem} (in it or the run's env.json); use checkpoints/best.pt")
    return cfg, DataInfo.from_dict(info), raw


def _image_tensor(path: str, info: DataInfo) -> torch.Tensor:
    channels, height, width = info.shape
    if Path(path).exists() and not Path(path).is_file():  # a FIFO or device would block the read forever
        raise UsageError(f"IMAGE {path}: not a regular file")
    try:
        with bomb_warnings_silenced(), open_image(path, "give a smaller image", f"IMAGE {path}") as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UsageError(f"IMAGE {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # Pillow's parsers raise all four
        raise UsageError(f"IMAGE {path}: unreadable image ({e})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    x = torch.from_numpy(arr.copy()).float().div_(255)
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    x = (x - mean) / std
    return resize(x[None], *info.resize)[0] if info.resize else x  # as training's batches were


@torch.no_grad()
def predict(checkpoint_path: str, images: list[str], topk: int = 5, device: str = "cpu") -> list[dict]:
    """Top-k classes with probabilities for each image file."""
    cfg, info, weights = _load_for_predict(checkpoint_path)
    dev = devices.resolve(device)
    model = build_model(cfg, info, dev)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError):
        raise UsageError(f"CHECKPOINT {checkpoint_path}: weights do not fit model '{cfg.model}'") from None
    model.eval()
    x = torch.stack([_image_tensor(p, info) for p in images]).to(dev)
    probs = model(x).float().softmax(dim=1).cpu()
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    classes = info.classes
    return [{"image": path, "top": [{"class": classes[i], "index": int(i), "prob": float(pr)}
                                    for pr, i in zip(top.values[n], top.indices[n])]}
            for n, path in enumerate(images)]
