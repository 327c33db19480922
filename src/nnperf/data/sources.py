"""Dataset registry: each source turns files into uint8 image tensors, labels and class names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import dataclasses
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision.datasets.utils import download_url

from ..errors import UsageError
from . import formats
from .archive import extract_tar
from .cache import cached, file_fingerprint
from .cache import default_dir as default_cache_dir

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path("data")


@dataclass(frozen=True)
class Source:
    """Which dataset to read, from where, and how: the settings the readers use, named as the
    training config names them."""

    dataset: str
    data: str | None = None  # the folder (default: a per-dataset location)
    download: bool = True
    cache_dir: str | None = None
    image_size: int | None = None  # ImageFolder images are shrunk to it (never enlarged); synthetic ones made so
    synthetic_size: int = 2048
    synthetic_classes: int = 10
    synthetic_channels: int = 3

    @classmethod
    def of(cls, settings) -> "Source":
        """The reader settings of `settings` (a TrainConfig, or anything with these attributes)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split | None  # the dataset's own test split, if it has one

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])




def _download_error(what: str, url: str, err: Exception, root: Path, archive: str) -> UsageError:
    return UsageError(f"--download: could not fetch {what} from {url} ({err}); without network, put {archive} "
                      f"into {root} (or point --data at a folder that has it) and run again")


# ---- CIFAR ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CifarSpec:
    title: str
    tv_class: type  # torchvision's class: its url, archive name, md5 and folder are the real ones
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


CIFAR10 = CifarSpec("CIFAR-10", tvd.CIFAR10, tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                    "batches.meta", "labels", "label_names")
CIFAR100 = CifarSpec("CIFAR-100", tvd.CIFAR100, ("train",), ("test",), "meta", "fine_labels", "fine_label_names")


def _cifar_folder(spec: CifarSpec, root: Path) -> Path | None:
    for folder in (root / spec.tv_class.base_folder, root):
        if all((folder / f).is_file() for f in spec.train_files + spec.test_files + (spec.meta_file,)):
            return folder
    return None


def fetch_cifar(spec: CifarSpec, root: Path, download: bool) -> Path:
    """The folder holding the CIFAR pickles, downloading and extracting the archive if allowed."""
    folder = _cifar_folder(spec, root)
    if folder is not None:
        return folder
    tv = spec.tv_class
    expected = f"{root}/{tv.base_folder}/{{{','.join(spec.train_files + spec.test_files)}}}"
    if not download:
        raise UsageError(f"--data {root}: no {spec.title} files (expected {expected}); pass --download, or put "
                         f"{tv.filename} (from {tv.url}) into {root}")
    try:
        # Verifies the md5 and skips the download when a good archive is already there.
        download_url(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise _download_error(spec.title, tv.url, e, root, tv.filename) from None
    # Not torchvision's extraction: it trusts every member name, and this one refuses escaping names.
    extract_tar(root / tv.filename, root, "--download")
    folder = _cifar_folder(spec, root)
    if folder is None:
        raise UsageError(f"{root}/{tv.filename}: extracted, but {expected} is still missing")
    return folder


def _load_cifar(spec: CifarSpec, src: Source) -> dict:
    root = Path(src.data) if src.data else DEFAULT_ROOT
    folder = fetch_cifar(spec, root, src.download)
    files = [folder / f for f in spec.train_files + spec.test_files + (spec.meta_file,)]

    def build() -> dict:
        xtr, ytr = formats.read_cifar_batches([folder / f for f in spec.train_files], spec.label_key)
        xte, yte = formats.read_cifar_batches([folder / f for f in spec.test_files], spec.label_key)
        classes = formats.read_cifar_meta(folder / spec.meta_file, spec.names_key)
        return {"train": _split_dict(xtr, ytr), "test": _split_dict(xte, yte), "classes": classes}

    return cached(src.cache_dir, ["cifar", spec.title, file_fingerprint(files)], build)


# ---- MNIST and Fashion-MNIST (IDX files) ----------------------------------------------------

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def _idx_folder_ok(folder: Path) -> bool:
    return all(formats.find_idx(folder, s) is not None for s in IDX_STEMS)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download made, innermost first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def fetch_idx(tv_class: type, title: str, src: Source, extra: tuple[Path, ...] = ()) -> Path:
    """The folder with the four IDX files: --data, torchvision's layout under it, Debian's package
    folder; downloaded from torchvision's mirrors when allowed."""
    root = Path(src.data) if src.data else DEFAULT_ROOT
    raw = root / tv_class.__name__ / "raw"
    candidates = (root, raw) + (() if src.data else extra)
    for folder in candidates:
        if _idx_folder_ok(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    if not src.download:
        hint = " (or apt-get install dataset-fashion-mnist)" if extra else ""
        raise UsageError(f"--data {root}: no {title} IDX files ({', '.join(s + '[.gz]' for s in IDX_STEMS)}) "
                         f"in {looked}; pass --download{hint}")
    made = [p for p in (raw, *raw.parents) if not p.exists()]  # to remove again if nothing arrives
    for filename, md5 in tv_class.resources:
        if (raw / filename).is_file():
            continue
        errors = []
        for mirror in tv_class.mirrors:
            try:
                download_url(mirror + filename, str(raw), filename=filename, md5=md5)
                break
            except (urllib.error.URLError, OSError, RuntimeError) as e:
                errors.append(e)
        else:
            _remove_if_empty(made)
            raise _download_error(title, tv_class.mirrors[0] + filename, errors[-1], raw, filename)
    if not _idx_folder_ok(raw):
        raise UsageError(f"{raw}: downloaded, but the {title} IDX files are still incomplete")
    return raw


def _load_idx(tv_class: type, title: str, src: Source, extra: tuple[Path, ...] = ()) -> dict:
    folder = fetch_idx(tv_class, title, src, extra)
    files = [formats.find_idx(folder, s) for s in IDX_STEMS]

    def build() -> dict:
        xtr, ytr = formats.read_idx_split(folder, "train")
        xte, yte = formats.read_idx_split(folder, "t10k")
        return {"train": _split_dict(xtr, ytr), "test": _split_dict(xte, yte), "classes": list(tv_class.classes)}

    return cached(src.cache_dir, ["idx", title, file_fingerprint(files)], build)


# ---- ImageFolder ------------------------------------------------------------------------------

def _extracted(archive: Path, cache_dir: str | None) -> Path:
    """A tar archive of an ImageFolder tree, extracted once into the cache; the folder holding train/."""
    key = hashlib.sha256(json.dumps(file_fingerprint([archive])).encode()).hexdigest()[:16]
    target = (Path(cache_dir) if cache_dir else default_cache_dir()) / "extracted" / key
    if not target.is_dir():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            extract_tar(archive, tmp, "--data")
        except UsageError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, target)  # whole or not at all
    found = sorted(p.parent for p in target.glob("**/train") if p.is_dir())
    return found[0] if found else target


def _load_imagefolder(src: Source) -> dict:
    if not src.data:
        raise UsageError("--data: --dataset imagefolder needs --data DIR with train/<class>/<images>")
    root = Path(src.data)
    if root.is_file() and tarfile.is_tarfile(root):
        root = _extracted(root, src.cache_dir)
    if not (root / "train").is_dir():
        raise UsageError(f"--data {root}: no train/ folder (expected {root}/train/<class>/<images>, "
                         "and optionally val/ or test/)")
    classes, train_samples = formats.scan_image_folder(root / "train")
    test_root = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    test_samples = []
    if test_root is not None:
        test_classes, test_samples = formats.scan_image_folder(test_root)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise UsageError(f"--data {test_root}: classes not in train/: {', '.join(unknown)}")
        remap = [classes.index(c) for c in test_classes]
        test_samples = [(f, remap[i]) for f, i in test_samples]
    files = [f for f, _ in train_samples + test_samples]

    def build() -> dict:
        xtr = formats.decode_images([f for f, _ in train_samples], src.image_size)
        out = {"train": _split_dict(xtr, np.array([i for _, i in train_samples])), "classes": classes}
        if test_samples:
            xte = formats.decode_images([f for f, _ in test_samples], (xtr.shape[3], xtr.shape[2]))
            out["test"] = _split_dict(xte, np.array([i for _, i in test_samples]))
        return out

    return cached(src.cache_dir, ["imagefolder", src.image_size, file_fingerprint(files)], build)


# ---- synthetic ----------------------------------------------------------------------------------

def make_synthetic(n: int, classes: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable dataset: each class is a fixed smooth random pattern, each image that pattern
    at a random contrast plus pixel noise. Class patterns do not depend on `seed`, so the train and
    test splits (made with different seeds) share them."""
    pattern_gen = torch.Generator().manual_seed(1234)
    coarse = torch.rand(classes, channels, 4, 4, generator=pattern_gen) * 2 - 1
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=gen) % classes
    contrast = 40 + 40 * torch.rand(n, 1, 1, 1, generator=gen)
    noise = 30 * torch.randn(n, channels, size, size, generator=gen)
    images = (128 + contrast * patterns[labels] + noise).clamp(0, 255).round().to(torch.uint8)
    return images, labels


def _load_synthetic(src: Source) -> dict:
    size = src.image_size or 32
    args = (src.synthetic_classes, src.synthetic_channels, size)
    n_test = max(src.synthetic_size // 4, src.synthetic_classes)
    train = make_synthetic(src.synthetic_size, *args, seed=1)
    test = make_synthetic(n_test, *args, seed=2)
    return {"train": _split_dict(*train), "test": _split_dict(*test),
            "classes": [f"class{i}" for i in range(src.synthetic_classes)]}


def _split_dict(images, labels) -> dict:
    """A split as the cache stores it (plain tensors); `load` makes it a Split."""
    return {"images": torch.as_tensor(images, dtype=torch.uint8).contiguous(),
            "labels": torch.as_tensor(labels, dtype=torch.int64)}


# ---- registry -------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[[Source], dict]] = {
    "cifar10": lambda src: _load_cifar(CIFAR10, src),
    "cifar100": lambda src: _load_cifar(CIFAR100, src),
    "fashion-mnist": lambda src: _load_idx(tvd.FashionMNIST, "Fashion-MNIST", src, (DEBIAN_FASHION_MNIST,)),
    "mnist": lambda src: _load_idx(tvd.MNIST, "MNIST", src),
    "imagefolder": _load_imagefolder,
    "synthetic": _load_synthetic,
}


def names() -> list[str]:
    return list(SOURCES)


def load(src: Source) -> Dataset:
    """Read (or fetch) the dataset that `src` names."""
    if src.dataset not in SOURCES:
        raise UsageError(f"--dataset: unknown dataset '{src.dataset}' (choose from {', '.join(SOURCES)})")
    raw = SOURCES[src.dataset](src)
    test = raw.get("test")
    ds = Dataset(src.dataset, list(raw["classes"]), Split(**raw["train"]), Split(**test) if test else None)
    if len(ds.train) == 0:
        raise UsageError(f"--dataset {src.dataset}: the training split is empty")
    bad = int(ds.train.labels.max()) >= len(ds.classes)
    if bad:
        raise UsageError(f"--dataset {src.dataset}: labels exceed the {len(ds.classes)} class names")
    return ds


def holdout(train: Split, n: int, seed: int) -> tuple[Split, Split]:
    """Split off `n` images for validation, chosen by a fixed-seed shuffle."""
    if n >= len(train):
        raise UsageError(f"--val-split: {n} is not less than the {len(train)} training images")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.take(order[n:].sort().values), train.take(order[:n].sort().values)
