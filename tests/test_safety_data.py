"""Data files never run code, never write outside their folder, and bad ones fail in one line.

Table-driven through tests/safety.py: each case runs `nnperf ...` from ROOT/work/here, with the
data prepared under ROOT by its setup, and states the files it may change.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import safety
from conftest import TINY, make_cifar_folder

MARKER = "MARKER"  # what a crafted file tries to create under ROOT; it must never appear
DATA = "../../data"  # ROOT/data, seen from ROOT/work/here
CIFAR_BATCH = "data/cifar-10-batches-py/data_batch_1"
TRAIN_CIFAR = ["train", "--dataset", "cifar10", "--data", DATA, "--no-download", "--epochs", "1", "--width", "8",
               "--batch-size", "16", "--name", "r", "--no-telemetry"]


# ---- crafted pickles ----------------------------------------------------------------------------

class _Reduces:
    """Pickles as a call of `func(*args)`, the way an attacker's file would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_command(root: Path) -> str:
    return f"touch {root / MARKER}"


CRAFTED = {
    "os-system": lambda root: _Reduces(os.system, _touch_command(root)),
    "subprocess-popen": lambda root: _Reduces(subprocess.Popen, ["touch", str(root / MARKER)]),
    "builtins-exec": lambda root: _Reduces(builtins.exec, f"open({str(root / MARKER)!r}, 'w').close()"),
    "builtins-eval": lambda root: _Reduces(builtins.eval, f"open({str(root / MARKER)!r}, 'w')"),
}


def _cifar_with(batch: str, payload):
    """Setup: the conftest CIFAR-10 folder under ROOT/data with one file replaced by `payload(root)`."""

    def setup(root: Path) -> None:
        folder = make_cifar_folder(root / "data")
        entry = payload(root)
        data = entry if isinstance(entry, bytes) else pickle.dumps(entry, protocol=2)
        (folder / batch).write_bytes(data)

    return setup


def _in_dict(make):
    return lambda root: {"data": make(root), "labels": [0], "batch_label": "x"}


def _other_codec(root: Path) -> bytes:
    # Protocol 2's bytes idiom, _codecs.encode, but with a codec other than latin1.
    return b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00base64\x86Rs."


# ---- decompression bombs --------------------------------------------------------------------------

def bomb_png(path: Path, width: int, height: int) -> Path:
    """A black 1-bit PNG of width x height: a few KB on disk, width*height pixels once decoded.
    Written chunk by chunk, so that making it never holds the image in memory."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _image_tree(root: Path, extra: tuple[str, int, int] | None = None) -> None:
    """ROOT/data/train/{cat,dog}/*.png, small and real, plus optionally one bomb among them."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "data" / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / "train" / c /
                                                                                    f"{i}.png")
    if extra:
        bomb_png(root / "data" / "train" / "dog" / extra[0], extra[1], extra[2])


# Pillow warns above Image.MAX_IMAGE_PIXELS (89478485 by default) and refuses above twice that.
WARNED = (10_000, 10_000)   # 1e8 pixels: only a warning from Pillow, refused by nnperf
REFUSED = (20_000, 20_000)  # 4e8 pixels: Pillow's own DecompressionBombError


# ---- archives -------------------------------------------------------------------------------------

def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]):
    """Setup: ROOT/evil.tar with a real ImageFolder tree plus the given crafted members."""

    def setup(root: Path) -> None:
        _image_tree(root / "src")
        with tarfile.open(root / "evil.tar", "w") as tar:
            tar.add(root / "src" / "data", arcname="tree")
            for info, body in members:
                tar.addfile(info, io.BytesIO(body) if body is not None else None)
        shutil.rmtree(root / "src")

    return setup


def _file(name: str, body: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


# ---- predict needs a trained checkpoint ---------------------------------------------------------

_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from nnperf import cli

    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("NNPERF_CACHE", str(folder / "cache"))
        assert cli.main(["train", *TINY, "--epochs", "1", "--name", "r", "--no-telemetry",
                         "--out-dir", str(folder / "runs")]) == 0
    _TRAINED["best"] = folder / "runs" / "r" / "checkpoints" / "best.pt"
    return _TRAINED["best"]


def _checkpoint_and(image: tuple[str, int, int]):
    def setup(root: Path) -> None:
        (root / "ckpt").mkdir()
        shutil.copy(_TRAINED["best"], root / "ckpt" / "best.pt")
        bomb_png(root / "images" / image[0], image[1], image[2])

    return setup


# ---- the cases ----------------------------------------------------------------------------------

def _crafted_cases() -> list[safety.Case]:
    cases = []
    for what, make in CRAFTED.items():
        setup = _cifar_with("data_batch_1", _in_dict(make))
        needles = ("data_batch_1", "refused to load")
        cases.append(safety.Case(f"datafile-cifar-pickle-{what}-show", ["data", "show", "--dataset", "cifar10",
                                 "--data", DATA], 2, needles, setup=setup))
        cases.append(safety.Case(f"datafile-cifar-pickle-{what}-train", TRAIN_CIFAR, 2, needles, setup=setup))
    return cases


CASES = _crafted_cases() + [
    safety.Case("datafile-cifar-pickle-names-the-global", ["data", "show", "--dataset", "cifar10", "--data", DATA],
                2, ("data_batch_1", "posix.system", "never contains"),
                setup=_cifar_with("data_batch_1", _in_dict(CRAFTED["os-system"]))),
    safety.Case("datafile-cifar-meta-crafted", ["data", "show", "--dataset", "cifar10", "--data", DATA], 2,
                ("batches.meta", "refused to load"), setup=_cifar_with("batches.meta", CRAFTED["os-system"])),
    safety.Case("datafile-cifar-pickle-other-codec", ["data", "show", "--dataset", "cifar10", "--data", DATA], 2,
                ("data_batch_1", "refused to load", "base64"), setup=_cifar_with("data_batch_1", _other_codec)),
    safety.Case("datafile-cifar-pickle-not-a-dict", ["data", "show", "--dataset", "cifar10", "--data", DATA], 2,
                ("data_batch_1", "not a dict"), setup=_cifar_with("data_batch_1", lambda root: [1, 2, 3])),
    safety.Case("datafile-cifar-pickle-data-not-pixels", ["data", "show", "--dataset", "cifar10", "--data", DATA],
                2, ("data_batch_1", "'data'"),
                setup=_cifar_with("data_batch_1", lambda root: {"data": [[1, 2]], "labels": [0]})),
    safety.Case("datafile-cifar-pickle-labels-mismatch", ["data", "show", "--dataset", "cifar10", "--data", DATA],
                2, ("data_batch_1", "labels"), setup=_cifar_with(
                    "data_batch_1", lambda root: {"data": np.zeros((2, 3072), np.uint8), "labels": [0]})),
    safety.Case("datafile-cifar-pickle-real-layout-loads", ["data", "show", "--dataset", "cifar10", "--data", DATA,
                "--out", "s.png"], 0, ("wrote",), may_change=("work/here/s.png",),
                setup=lambda root: make_cifar_folder(root / "data")),

    safety.Case("datafile-image-bomb-warned-train", ["train", "--dataset", "imagefolder", "--data", DATA,
                "--epochs", "1", "--name", "r", "--no-telemetry"], 2,
                ("bomb.png", "10000 x 10000 pixels", "decompression bomb"),
                setup=lambda root: _image_tree(root, ("bomb.png", *WARNED))),
    safety.Case("datafile-image-bomb-refused-train", ["train", "--dataset", "imagefolder", "--data", DATA,
                "--epochs", "1", "--name", "r", "--no-telemetry"], 2,
                ("bomb.png", "400000000 pixels", "decompression bomb"),
                setup=lambda root: _image_tree(root, ("bomb.png", *REFUSED))),
    safety.Case("datafile-image-bomb-data-show", ["data", "show", "--dataset", "imagefolder", "--data", DATA], 2,
                ("bomb.png", "decompression bomb"), setup=lambda root: _image_tree(root, ("bomb.png", *WARNED))),
    safety.Case("datafile-image-bomb-warned-predict", ["predict", "../../ckpt/best.pt", "../../images/bomb.png"], 2,
                ("bomb.png", "10000 x 10000 pixels", "decompression bomb"),
                setup=_checkpoint_and(("bomb.png", *WARNED))),
    safety.Case("datafile-image-bomb-refused-predict", ["predict", "../../ckpt/best.pt", "../../images/bomb.png"],
                2, ("bomb.png", "400000000 pixels", "decompression bomb"),
                setup=_checkpoint_and(("bomb.png", *REFUSED))),

    safety.Case("datafile-tar-member-dotdot", ["data", "show", "--dataset", "imagefolder", "--data", "../../evil.tar"],
                2, ("evil.tar", "refused to extract", "'..'"), setup=_tar([_file("../../escaped.txt")])),
    safety.Case("datafile-tar-member-absolute", ["data", "show", "--dataset", "imagefolder", "--data",
                "../../evil.tar"], 2, ("evil.tar", "refused to extract", "absolute"),
                setup=_tar([_file("/tmp/nnperf-escaped.txt")])),
    safety.Case("datafile-tar-symlink-outside", ["data", "show", "--dataset", "imagefolder", "--data",
                "../../evil.tar"], 2, ("evil.tar", "refused to extract", "links to"),
                setup=_tar([_link("tree/out", "../../.."), _file("tree/out/escaped.txt")])),
    safety.Case("datafile-tar-symlink-absolute", ["data", "show", "--dataset", "imagefolder", "--data",
                "../../evil.tar"], 2, ("evil.tar", "refused to extract", "links to"),
                setup=_tar([_link("tree/etc", "/etc")])),
    safety.Case("datafile-tar-hardlink-outside", ["data", "show", "--dataset", "imagefolder", "--data",
                "../../evil.tar"], 2, ("evil.tar", "refused to extract", "links to"),
                setup=_tar([_link("tree/passwd", "/etc/passwd", tarfile.LNKTYPE)])),
    safety.Case("datafile-tar-device", ["data", "show", "--dataset", "imagefolder", "--data", "../../evil.tar"], 2,
                ("evil.tar", "refused to extract", "special file"),
                setup=_tar([_link("tree/fifo", "", tarfile.FIFOTYPE)])),
    safety.Case("datafile-tar-inner-symlink-is-fine", ["data", "show", "--dataset", "imagefolder", "--data",
                "../../evil.tar", "--out", "s.png"], 0, ("wrote",), may_change=("work/here/s.png",),
                setup=_tar([_link("tree/train/cat/alias.png", "0.png")])),

    safety.Case("input-data-show-per-class-huge", ["data", "show", "--dataset", "synthetic", "--per-class",
                                                   str(2**70)], 2, ("--per-class", "1 to 1000")),
    safety.Case("input-data-show-seed-huge", ["data", "show", "--dataset", "synthetic", "--seed", str(2**70)], 2,
                ("--seed",)),
    safety.Case("input-data-show-out-is-a-folder", ["data", "show", "--dataset", "synthetic", "--out", "grids"], 2,
                ("--out grids", "must be a file name", "samples.png"),
                setup=lambda root: (root / "work" / "here" / "grids").mkdir()),
    safety.Case("input-data-show-out-trailing-slash", ["data", "show", "--dataset", "synthetic", "--out", "new/"], 2,
                ("--out new/", "must be a file name")),
    safety.Case("input-data-show-out-through-a-file", ["data", "show", "--dataset", "synthetic", "--out",
                "notes.txt/s.png"], 2, ("notes.txt", "is a file, not a folder"),
                setup=lambda root: (root / "work" / "here" / "notes.txt").write_text("keep\n")),
    safety.Case("input-data-show-out-missing-parent-is-created", ["data", "show", "--dataset", "synthetic", "--out",
                "grids/new/s.png"], 0, ("wrote",), may_change=("work/here/grids/new/s.png",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(run_cli, tmp_path, case, request):
    if "-predict" in case.id:
        request.getfixturevalue("tiny_checkpoint")
    safety.check(run_cli, tmp_path, case)
    assert not (tmp_path / MARKER).exists(), "a data file ran code"
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/nnperf-escaped.txt").exists()
