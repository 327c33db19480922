"""Stitch the PNGs of a folder into one labelled grid image."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .. import fileio
from ..errors import UsageError

LABEL_PX = 28


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def montage(folder: str | Path, out: str | Path, cols: int = 3, cell_width: int | None = None) -> tuple[Path, int]:
    """Write the grid to `out`; returns (out, number of images). Every PNG is scaled to one cell
    width (the widest image's unless `cell_width`), labelled with its file name above it."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder (give the folder that holds the PNGs)")
    if cols < 1:
        raise UsageError(f"--cols: must be 1 or more, got {cols}")
    if cell_width is not None and not 16 <= cell_width <= 10_000:
        raise UsageError(f"--width: must be 16 to 10000 pixels, got {cell_width}")
    paths = sorted(p for p in folder.glob("*.png") if p.resolve() != out.resolve())
    if not paths:
        raise UsageError(f"{folder}: no .png files to put in a montage")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise UsageError(f"{p}: not a readable PNG ({e})") from None
    width = cell_width or max(im.width for im in images)
    scaled = [im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
              if im.width != width else im for im in images]
    cell_h = max(im.height for im in scaled) + LABEL_PX
    cols = min(cols, len(scaled))
    rows = math.ceil(len(scaled) / cols)
    canvas = Image.new("RGB", (cols * width, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(canvas), _font(18)
    for i, (p, im) in enumerate(zip(paths, scaled)):
        x, y = (i % cols) * width, (i // cols) * cell_h
        draw.text((x + 8, y + 4), p.stem, fill="black", font=font)
        canvas.paste(im, (x, y + LABEL_PX))
    fileio.write_with(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out, len(paths)
