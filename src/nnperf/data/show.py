"""`nnperf data`: counts per class and a grid of sample images with their class names."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .. import fileio
from ..errors import UsageError
from .formats import shown_name
from .sources import Dataset, Split

CELL = 96  # pixels per sample, enlarged with nearest-neighbour so the pixels stay visible
CAPTION = 22


def counts(ds: Dataset) -> str:
    """A table of images per class in each split, with the total."""
    splits = {"train": ds.train, **({"test": ds.test} if ds.test is not None else {})}
    per = {name: torch.bincount(s.labels, minlength=len(ds.classes)).tolist() for name, s in splits.items()}
    names = [shown_name(c) for c in ds.classes]  # folder names can hold control characters too
    width = max(12, *(len(c) for c in names))
    lines = [f"{'class':{width}s} " + " ".join(f"{n:>8s}" for n in per)]
    for i, cls in enumerate(names):
        lines.append(f"{cls:{width}s} " + " ".join(f"{per[n][i]:8d}" for n in per))
    lines.append(f"{'total':{width}s} " + " ".join(f"{len(splits[n]):8d}" for n in per))
    return "\n".join(lines)


def sample_index(split: Split, classes: int, per_class: int, seed: int) -> list[int]:
    """`per_class` random images of each class (fewer where a class has fewer), class by class."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(classes):
        members = torch.nonzero(split.labels == c).flatten()
        chosen += members[torch.randperm(len(members), generator=gen)[:per_class]].tolist()
    return chosen


def _font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:
        return ImageFont.load_default()


def check_out(out: str | Path) -> Path:
    """`--out` as a file path to write the grid to, or one line saying why it cannot be one.
    A missing parent folder is fine (the write creates it); a folder or a path through a file is not."""
    path = Path(out)
    if str(out).endswith(("/", os.sep)) or path.is_dir():
        raise UsageError(f"--out {out}: is a folder; --out must be a file name, e.g. {path / 'samples.png'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {out}: {parent} is a file, not a folder; choose another path")
    return path


def grid(ds: Dataset, out: str | Path, per_class: int = 8, seed: int = 0) -> Path:
    """A PNG with one row per class (at most 20 classes shown) and `per_class` samples in each."""
    out = check_out(out)
    shown = min(len(ds.classes), 20)
    index = sample_index(ds.train, shown, per_class, seed)
    rows = [[i for i in index if int(ds.train.labels[i]) == c] for c in range(shown)]
    canvas = Image.new("RGB", (per_class * CELL, shown * (CELL + CAPTION)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for r, members in enumerate(rows):
        y = r * (CELL + CAPTION)
        draw.text((4, y + 4), shown_name(ds.classes[r]), fill="black", font=font)
        for col, i in enumerate(members):
            pixels = ds.train.images[i].permute(1, 2, 0).numpy()
            image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            canvas.paste(image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST),
                         (col * CELL, y + CAPTION))
    fileio.write_with(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out
