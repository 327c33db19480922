"""Readers for the standard dataset file formats, each returning uint8 NCHW arrays and labels."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import re
import warnings
import zlib
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
            dtype, dims = _idx_header(path, f)
            expected = math.prod(dims.tolist()) * dtype.itemsize  # Python ints: a crafted header cannot overflow
            # Only as many bytes as the header announces: a small gzip file that inflates to
            # gigabytes of trailing data is never read into memory.
            raw = _read_at_most(f, expected)
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < expected:
        raise UsageError(f"{path}: truncated IDX file ({len(raw)} of {expected} data bytes)")
    return np.frombuffer(raw, dtype=dtype, count=math.prod(dims.tolist())).reshape(dims)


def _idx_header(path: Path, f) -> tuple[np.dtype, np.ndarray]:
    """The element type and dimensions from an IDX header (magic number, then one int32 per dim)."""
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise UsageError(f"{path}: not an IDX file (bad magic number)")
    raw_dims = f.read(4 * head[3])
    if len(raw_dims) < 4 * head[3]:
        raise UsageError(f"{path}: truncated IDX file (header ends inside its {head[3]} dimensions)")
    dims = np.frombuffer(raw_dims, dtype=">i4").astype(np.int64)
    if (dims < 0).any():
        raise UsageError(f"{path}: not an IDX file (negative dimension in {dims.tolist()})")
    return np.dtype(_IDX_DTYPES[head[2]]), dims


def _read_at_most(f, n: int, chunk: int = 1 << 24) -> bytes:
    """Up to `n` bytes, read in chunks so that a header claiming terabytes costs only what is there."""
    parts, got = [], 0
    while got < n:
        part = f.read(min(chunk, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


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

class _Refused(pickle.UnpicklingError):
    """A global (or an argument) that no CIFAR batch file asks for: the load stops there."""


def _numpy_core(module: str, name: str):
    # numpy 2 moved numpy.core to numpy._core; pickles made by either name the one they had.
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module), name)


def _latin1_encode(text, encoding="latin1"):
    # Protocol 2 stores Python 3 bytes as _codecs.encode(str, "latin1"); any other codec is refused.
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise _Refused(f"it asks for _codecs.encode with the '{encoding}' codec")
    return text.encode("latin1")


# Everything a CIFAR-10/100 python pickle needs: numpy arrays and dtypes (and numpy scalars, in
# copies re-saved with numpy), under numpy 1's and 2's module names, and protocol 2's bytes.
# Each of these only builds data; nothing in the list can run code, open files or import modules.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # A fresh function per lookup: a crafted BUILD opcode can set attributes (even __defaults__) on
    # whatever find_class returns, and must not reach the shared _latin1_encode.
    ("_codecs", "encode"): lambda: lambda *args: _latin1_encode(*args),
    **{(f"numpy.{core}.multiarray", name): (lambda name=name: _numpy_core("multiarray", name))
       for core in ("core", "_core") for name in ("_reconstruct", "scalar")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): (lambda: _numpy_core("numeric", "_frombuffer"))
       for core in ("core", "_core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that admits only the globals of _CIFAR_GLOBALS: a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise _Refused(f"it asks for {module}.{name}, which a CIFAR batch file never contains")
        return make()


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise UsageError(f"{path}: refused to load: {e}") from None
    except Exception as e:  # noqa: BLE001 - a malformed file fails in many ways; each gets the same one line
        raise UsageError(f"{path}: not a readable CIFAR batch file ({_first_line(e)})") from None
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: not a CIFAR batch file (it holds a {type(entry).__name__}, not a dict)")
    return entry


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _int_list(path: Path, key: str, value) -> np.ndarray:
    # Real files hold a list of ints; checking each item also refuses nested (self-referencing,
    # exponentially shared) lists that numpy would otherwise walk for ever.
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        raise UsageError(f"{path}: '{key}' is not a list of integers")
    try:
        return np.asarray(value, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise UsageError(f"{path}: '{key}' holds integers too large to be class labels") from None


def _cifar_pixels(path: Path, value) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.size % 3072:
        shown = f"a {value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else \
            f"a {type(value).__name__}"
        raise UsageError(f"{path}: 'data' is {shown}, not uint8 rows of 3072 pixels (3x32x32)")
    return value.reshape(-1, 3, 32, 32)


def read_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR batch pickles into (N,3,32,32) uint8 images and int64 labels."""
    images, labels = [], []
    for p in paths:
        entry = _unpickle(p)
        if "data" not in entry or label_key not in entry:
            raise UsageError(f"{p}: CIFAR batch without 'data'/'{label_key}' entries")
        images.append(_cifar_pixels(p, entry["data"]))
        labels.append(_int_list(p, label_key, entry[label_key]))
        if len(images[-1]) != len(labels[-1]):
            raise UsageError(f"{p}: {len(images[-1])} images but {len(labels[-1])} labels")
        if labels[-1].size and labels[-1].min() < 0:
            raise UsageError(f"{p}: negative labels in '{label_key}'")
    return np.concatenate(images), np.concatenate(labels)


def shown_name(text: object, limit: int = 100) -> str:
    """A class name read from a data file, safe to print: no control characters (a crafted name
    could otherwise move the cursor or rewrite the terminal), at most `limit` characters."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def read_cifar_meta(path: Path, key: str) -> list[str]:
    names = _unpickle(path).get(key)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise UsageError(f"{path}: no list of class names under '{key}'")
    return [shown_name(n.decode("latin1") if isinstance(n, bytes) else n) for n in names]


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


# ---- images (ImageFolder trees, `nnperf predict`) -------------------------------------------

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(shown: str, pixels: str, remedy: str) -> UsageError:
    return UsageError(f"{shown}: image of {pixels} pixels is larger than the limit of {Image.MAX_IMAGE_PIXELS} "
                      f"pixels (a decompression bomb?); {remedy}")


def open_image(path: str | os.PathLike, remedy: str = "remove it or shrink it",
               shown: str | None = None) -> Image.Image:
    """Image.open, with images over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
    refused in one line before any pixel is decoded. Pillow itself only warns up to twice the
    limit; this checks the header's size, which is cheap and safe to do from any thread.
    `shown` names the file in the message (default: the path)."""
    shown = shown or str(path)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses before we see the size
        found = _BOMB_PIXELS.search(str(e))
        raise _too_large(shown, found.group(1) if found else "more than twice that many", remedy) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.size[0] * im.size[1] > limit:
        im.close()
        raise _too_large(shown, f"{im.size[0]} x {im.size[1]}", remedy)
    return im


@contextlib.contextmanager
def bomb_warnings_silenced():
    """Hide Pillow's DecompressionBombWarning while images are read: open_image refuses those
    images with its own line, and the warning would only add lines of noise before it.
    Entered once by the calling thread around all the reads, never inside worker threads:
    catch_warnings swaps the process-wide filter list, which threads entering it at once would garble."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    remedy = "remove it from the folder or shrink it"
    try:
        with open_image(path, remedy) as im:
            im = im.convert("RGB")
            if size is not None and im.size != size:
                im = im.resize(size, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"{path}: unreadable image ({e}); fix or remove it") from None
    return arr.transpose(2, 0, 1)


def decode_images(files: list[Path], image_size: int | tuple[int, int] | None) -> np.ndarray:
    """Decode image files to (N,3,H,W) uint8 RGB, all resized to one size so that they stack into
    one array: `image_size` where that shrinks the first image (less memory), else the first
    image's size (a larger --image-size is reached on the device, per batch: the dataset stays
    small). A (width, height) tuple is taken as it is."""
    with bomb_warnings_silenced():
        first = _decode(files[0], None)
        native = (first.shape[2], first.shape[1])  # PIL sizes are (width, height)
        if isinstance(image_size, int):
            size = (image_size, image_size) if image_size < max(native) else native
        else:
            size = image_size or native
        # Pillow releases the GIL while decoding, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            arrays = list(pool.map(lambda f: _decode(f, size), files, chunksize=256))
    return np.stack(arrays)
