"""Stitch the PNGs of a folder into one labelled grid image."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..errors import UsageError
from . import outputs

LABEL_PX = 28
TAG = "nnperf"  # PNG text key marking a montage this command wrote
DEFAULT_PIXEL_LIMIT = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _pixel_limit() -> int:
    # Pillow's own guard against decompression bombs (None when a program switched it off).
    return Image.MAX_IMAGE_PIXELS or DEFAULT_PIXEL_LIMIT


def _is_ours(path: Path) -> bool:
    """Whether `path` is a montage this command wrote (tagged in the PNG), which it may replace."""
    try:
        with Image.open(path) as im:
            return im.info.get(TAG) == "montage"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _load(p: Path) -> Image.Image:
    """One image, decoded only when its header's size is below Pillow's pixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it once
            with Image.open(p) as im:
                width, height = im.size
                if width * height > _pixel_limit():
                    raise UsageError(f"{p}: {width}x{height} pixels is more than the {_pixel_limit():,} this decodes "
                                     "(a decompression bomb?); move it out of the folder")
                return im.convert("RGB")
    except Image.DecompressionBombError:
        raise UsageError(f"{p}: more pixels than the {_pixel_limit():,} this decodes (a decompression bomb?); "
                         "move it out of the folder") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"{p}: not a readable PNG ({e})") from None


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
    found = sorted(p for p in folder.glob("*.png") if p.is_file())
    # An earlier montage in the folder is left out and replaced; any other PNG there is an input.
    paths = [p for p in found if not (p.resolve() == out.resolve() and _is_ours(p))]
    if any(p.resolve() == out.resolve() for p in paths):
        raise UsageError(f"--out {out}: is one of the images to stitch (not a montage nnperf wrote), so writing "
                         "there would replace it; give --out another file name")
    outputs.file_target("--out", out, example="montage.png")
    if not paths:
        raise UsageError(f"{folder}: no .png files to put in a montage")
    images = [_load(p) for p in paths]
    width = cell_width or max(im.width for im in images)
    heights = [max(1, round(im.height * width / im.width)) for im in images]
    cell_h = max(heights) + LABEL_PX
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    if cols * width * rows * cell_h > _pixel_limit():
        raise UsageError(f"--width/--cols: the grid would be {cols * width}x{rows * cell_h} pixels, more than "
                         f"{_pixel_limit():,}; give a smaller --width or fewer images")
    scaled = [im.resize((width, h), Image.Resampling.LANCZOS) if im.width != width else im
              for im, h in zip(images, heights)]
    canvas = Image.new("RGB", (cols * width, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(canvas), _font(18)
    for i, (p, im) in enumerate(zip(paths, scaled)):
        x, y = (i % cols) * width, (i // cols) * cell_h
        draw.text((x + 8, y + 4), p.stem, fill="black", font=font)
        canvas.paste(im, (x, y + LABEL_PX))
    tag = PngImagePlugin.PngInfo()
    tag.add_text(TAG, "montage")
    outputs.write_with(out, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=tag))
    return out, len(paths)
