"""Readers for the standard dataset file formats, each returning uint8 NCHW arrays and labels."""

from __future__ import annotations

import gzip
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UsageError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    offset = 4 + 4 * ndim
    if len(raw) - offset < expected:
        raise UsageError(f"{path}: truncated IDX file ({len(raw) - offset} of {expected} data bytes)")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)), offset=offset).reshape(dims)


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,1,H,W) uint8 and labels (N,) int64 of `train` or `t10k` in an IDX folder."""
    images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UsageError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    return np.ascontiguousarray(images[:, None].astype(np.uint8)), labels.astype(np.int64)


# ---- CIFAR python pickles -------------------------------------------------------------------

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise UsageError(f"{path}: not a readable CIFAR batch file ({e})") from None


def read_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR batch pickles into (N,3,32,32) uint8 images and int64 labels."""
    images, labels = [], []
    for p in paths:
        entry = _unpickle(p)
        if "data" not in entry or label_key not in entry:
            raise UsageError(f"{p}: CIFAR batch without 'data'/'{label_key}' entries")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_cifar_meta(path: Path, key: str) -> list[str]:
    return [str(n) for n in _unpickle(path)[key]]


# ---- ImageFolder trees ------------------------------------------------------------------------

def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted folder names) and (file, class index) pairs; clear errors for empty trees."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UsageError(f"--data {root}: no class folders (expected {root}/<class>/<image files>)")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise UsageError(f"--data {root}: class folder '{name}' has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        samples += [(f, index) for f in files]
    return classes, samples


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != size:
                im = im.resize(size, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"{path}: unreadable image ({e}); fix or remove it") from None
    return arr.transpose(2, 0, 1)


def decode_images(files: list[Path], image_size: int | tuple[int, int] | None) -> np.ndarray:
    """Decode image files to (N,3,H,W) uint8 RGB, all resized to `image_size` (or to the first
    image's size) so that they stack into one array."""
    first = _decode(files[0], None)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    size = size or (first.shape[2], first.shape[1])  # PIL sizes are (width, height)
    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        arrays = list(pool.map(lambda f: _decode(f, size), files, chunksize=256))
    return np.stack(arrays)
