import builtins
import hashlib
import http.server
import io
import os
import pickle
import struct
import subprocess
import tarfile
import threading
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from nnperf import config, data
from nnperf.data import archive, augment, formats, sources
from nnperf.errors import UsageError

from conftest import SHARED, make_cifar_folder, make_idx_folder, write_idx


def cfg(**kw):
    return config.build({}, kw)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_round_trips(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, gz)
    np.testing.assert_array_equal(formats.read_idx(path), arr)


def test_idx_reader_rejects_truncated_file(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((5, 4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(UsageError, match="truncated"):
        formats.read_idx(path)


@pytest.mark.parametrize("name,gz", [("fashion-mnist", True), ("mnist", False)])
def test_mnist_family_from_idx_files(tmp_path, name, gz):
    make_idx_folder(tmp_path / "d", gz=gz)
    ds = data.load(cfg(dataset=name, data=str(tmp_path / "d"), download=False))
    assert ds.train.images.shape == (40, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (20, 1, 28, 28)
    assert len(ds.classes) == 10 and ds.train.labels.tolist()[:3] == [0, 1, 2]


def test_fashion_mnist_torchvision_layout(tmp_path):
    make_idx_folder(tmp_path / "d" / "FashionMNIST" / "raw")
    ds = data.load(cfg(dataset="fashion-mnist", data=str(tmp_path / "d"), download=False))
    assert ds.classes[0] == "T-shirt/top" and len(ds.train) == 40


def test_fashion_mnist_debian_package_when_installed():
    if not sources.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    ds = data.load(cfg(dataset="fashion-mnist", download=False))
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles(tmp_path, hundred):
    folder = make_cifar_folder(tmp_path / "d", hundred=hundred)
    ds = data.load(cfg(dataset="cifar100" if hundred else "cifar10", data=str(tmp_path / "d"), download=False))
    assert ds.train.images.shape == (50, 3, 32, 32)
    assert len(ds.classes) == (100 if hundred else 10)
    # Pixels are laid out as CIFAR stores them: 1024 red, then green, then blue values per image.
    import pickle
    first = pickle.load(open(folder / ("train" if hundred else "data_batch_1"), "rb"), encoding="latin1")
    np.testing.assert_array_equal(ds.train.images[0].numpy().reshape(-1), first["data"][0])


def _cifar_archive(tmp_path):
    make_cifar_folder(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


def test_cifar_download_from_a_local_server(tmp_path, monkeypatch):
    """The real download path (torchvision's fetch, md5 check, extraction), served from loopback."""
    archive = _cifar_archive(tmp_path)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cifar-10-python.tar.gz").write_bytes(archive)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tv = sources.CIFAR10.tv_class
        monkeypatch.setattr(tv, "url", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
        monkeypatch.setattr(tv, "tgz_md5", hashlib.md5(archive).hexdigest())
        ds = data.load(cfg(dataset="cifar10", data=str(tmp_path / "dl"), download=True))
    finally:
        server.shutdown()
    assert len(ds.train) == 50 and len(ds.test) == 10
    assert (tmp_path / "dl" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.CIFAR10.tv_class, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UsageError, match="could not fetch CIFAR-10.*put cifar-10-python.tar.gz into"):
        data.load(cfg(dataset="cifar10", data=str(tmp_path / "dl"), download=True))


def _image_folder(root, classes=("cat", "dog"), per_class=3, fmt="PNG", size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.{fmt.lower()}", format=fmt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_imagefolder_train_and_test(tmp_path, fmt):
    _image_folder(tmp_path / "d" / "train", fmt=fmt)
    _image_folder(tmp_path / "d" / "test", per_class=2, fmt=fmt)
    ds = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d")))
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (6, 3, 10, 12) and ds.test.images.shape == (4, 3, 10, 12)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    if fmt == "PNG":  # lossless: the pixels must be exactly the file's
        png = np.asarray(Image.open(tmp_path / "d" / "train" / "dog" / "0.png"))
        np.testing.assert_array_equal(ds.train.images[3].numpy().transpose(1, 2, 0), png)


def test_imagefolder_resizes_to_image_size(tmp_path):
    _image_folder(tmp_path / "d" / "train")
    ds = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d"), image_size=8))
    assert ds.train.images.shape == (6, 3, 8, 8)


def test_decoded_dataset_is_cached(tmp_path, monkeypatch):
    _image_folder(tmp_path / "d" / "train")
    first = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d")))
    monkeypatch.setattr(formats, "decode_images", lambda *a: pytest.fail("decoded again despite the cache"))
    second = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d")))
    assert torch.equal(first.train.images, second.train.images)


def test_cache_is_rebuilt_when_a_file_changes(tmp_path):
    _image_folder(tmp_path / "d" / "train")
    data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d")))
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "d" / "train" / "cat" / "0.png")
    ds = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d")))
    assert ds.train.images[0, 0].unique().tolist() == [255]


def test_synthetic_is_learnable_and_deterministic():
    a = data.load(cfg(dataset="synthetic", synthetic_size=100, image_size=8))
    b = data.load(cfg(dataset="synthetic", synthetic_size=100, image_size=8))
    assert torch.equal(a.train.images, b.train.images)
    # Class means differ far more than the noise of a mean over ~10 images.
    means = torch.stack([a.train.images[a.train.labels == k].float().mean(0) for k in range(10)])
    assert (means[0] - means[1]).abs().mean() > 10


def test_holdout_is_fixed_by_seed_and_disjoint():
    split = data.Split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100))
    tr1, va1 = data.holdout(split, 10, seed=3)
    tr2, va2 = data.holdout(split, 10, seed=3)
    _, va3 = data.holdout(split, 10, seed=4)
    assert torch.equal(va1.labels, va2.labels) and not torch.equal(va1.labels, va3.labels)
    assert sorted(tr1.labels.tolist() + va1.labels.tolist()) == list(range(100))


@pytest.mark.parametrize("mode", ["zero", "reflect"])
@pytest.mark.parametrize("cutout", [0, 5])
def test_batched_crop_flip_matches_per_image_reference(mode, cutout):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 12, 10), dtype=torch.uint8)
    d = augment.draw(32, 3, True, gen, (12, 10), cutout)
    batched = augment.crop_flip(images, d, 3, mode, cutout)
    for i in range(32):
        ref = augment.crop_flip_one(images[i], int(d.dy[i]), int(d.dx[i]), bool(d.flip[i]), 3, mode, cutout,
                                    int(d.cy[i]), int(d.cx[i]))
        assert torch.equal(batched[i], ref), i
    assert d.flip.any() and not d.flip.all()
    assert ((batched == 0).any() if mode == "zero" or cutout else not (batched == 0).any())


def test_alternating_flip_flips_each_image_on_every_other_epoch():
    n = 64
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, :, 0] = 255  # left column bright: a flip moves it right
    split = data.Split(images, torch.arange(n))
    aug = data.Augment(flip="alternate")
    b = data.Batches(split, 16, torch.device("cpu"), [0.0], [1.0], shuffle=True, augment=aug, seed=2)

    def flipped(epoch):
        out = torch.zeros(n, dtype=torch.bool)
        for x, y in b.epoch(epoch):
            out[y] = x[:, 0, 0, 1] > x[:, 0, 0, 0]
        return out

    e0, e1, e2 = flipped(0), flipped(1), flipped(2)
    assert 0.25 < e0.float().mean() < 0.75
    assert torch.equal(e1, ~e0) and torch.equal(e2, e0)


def test_loader_yields_every_image_once_per_epoch_and_resumes_mid_epoch():
    n = 103
    split = data.Split(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n))
    b = data.Batches(split, 10, torch.device("cpu"), [0.0], [1.0], shuffle=True, seed=1)
    labels = torch.cat([y for _, y in b.epoch(0)])
    assert sorted(labels.tolist()) == list(range(n))
    assert labels.tolist() != sorted(labels.tolist())
    later = torch.cat([y for _, y in b.epoch(0, start=4)])
    assert torch.equal(later, labels[40:])
    assert not torch.equal(torch.cat([y for _, y in b.epoch(1)]), labels)


def test_dataloader_path_gives_the_same_batches():
    split = data.Split(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    kw = dict(shuffle=True, augment=data.Augment(crop=True, flip="alternate", pad=2, cutout=3), seed=5)
    a = data.make_batches(split, 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3, **kw)
    b = data.make_batches(split, 8, torch.device("cpu"), [0.5] * 3, [0.25] * 3, loader="torch", workers=1, **kw)
    for epoch in (2, 3):  # with persistent workers, a second epoch reuses them
        for (xa, ya), (xb, yb) in zip(a.epoch(epoch, start=1), b.epoch(epoch, start=1), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cifar10_jpeg_split_reads_as_imagefolder(tmp_path):
    archive = SHARED / "datasets" / "cifar10-jpeg-train.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is not here")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(("0000.jpg", "0001.jpg"))]
        tar.extractall(tmp_path, members=members, filter="data")
    ds = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "cifar10-jpeg")))
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert ds.train.images.shape[1:] == (3, 32, 32) and len(ds.train) == 20


def test_imagefolder_from_a_tar_archive_is_extracted_once(tmp_path):
    _image_folder(tmp_path / "src" / "tree" / "train")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "tree", arcname="tree")
    ds = data.load(cfg(dataset="imagefolder", data=str(tmp_path / "tree.tar.gz"), val_split=2))
    assert ds.classes == ["cat", "dog"] and len(ds.train) == 6
    extracted = list((tmp_path / "cache" / "extracted").iterdir())
    assert len(extracted) == 1 and (extracted[0] / "tree" / "train" / "cat").is_dir()


# ---- data files never run code ------------------------------------------------------------------

def _py2_cifar_pickle(n: int = 2) -> tuple[bytes, np.ndarray]:
    """A batch pickled the way Python 2 and numpy 1 wrote the real cifar-10-batches-py files:
    numpy.core names, the pixels as a Python 2 str (BINSTRING), byte-string keys."""
    pixels = np.arange(n * 3072, dtype=np.uint32).astype(np.uint8).reshape(n, 3072)
    raw = pixels.tobytes()
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01K" + bytes([n]) + b"M\x00\x0c\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
             b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", len(raw)) + raw
             + b"tb")
    labels = b"]" + b"(" + b"".join(b"K" + bytes([i % 10]) for i in range(n)) + b"e"
    body = b"\x80\x02}(U\x04data" + array + b"U\x06labels" + labels + b"U\x0bbatch_labelU\x01xu."
    return body, pixels


def test_cifar_reader_loads_python2_numpy1_pickles(tmp_path):
    body, pixels = _py2_cifar_pickle()
    (tmp_path / "b").write_bytes(body)
    images, labels = formats.read_cifar_batches([tmp_path / "b"], "labels")
    np.testing.assert_array_equal(images.reshape(2, -1), pixels)
    assert labels.tolist() == [0, 1]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_reader_loads_current_numpy_pickles(tmp_path, protocol):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    entry = {"data": pixels, "labels": [np.int64(1), 2, 3], "batch_label": b"x", "filenames": ["a.png"] * 3}
    (tmp_path / "b").write_bytes(pickle.dumps(entry, protocol=protocol))
    images, labels = formats.read_cifar_batches([tmp_path / "b"], "labels")
    np.testing.assert_array_equal(images.reshape(3, -1), pixels)
    assert labels.tolist() == [1, 2, 3]
    # numpy 1's module names (numpy.core) load as well as numpy 2's (numpy._core).
    old = pickle.dumps(entry, protocol=protocol).replace(b"numpy._core", b"numpy.core")
    if protocol < 4:  # longer names shift no length prefixes before protocol 4's framing
        (tmp_path / "old").write_bytes(old)
        assert formats.read_cifar_batches([tmp_path / "old"], "labels")[1].tolist() == [1, 2, 3]


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("func,args,named", [
    (os.system, ("touch MARKER",), "posix.system"),
    (subprocess.Popen, (["touch", "MARKER"],), "Popen"),  # protocol 2 names it commands.Popen (Python 2's)
    (builtins.exec, ("open('MARKER', 'w')",), "exec"),
    (getattr, (np.ndarray, "tofile"), "getattr"),  # a method of an admitted class, reached by getattr
    (np.load, ("MARKER",), "numpy.load"),
])
def test_cifar_reader_refuses_every_other_global(tmp_path, func, args, named, protocol):
    (tmp_path / "b").write_bytes(pickle.dumps({"data": _Call(func, *args), "labels": []}, protocol=protocol))
    with pytest.raises(UsageError) as info:
        formats.read_cifar_batches([tmp_path / "b"], "labels")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'b'}: refused to load") and named in message and "\n" not in message
    assert not (tmp_path / "MARKER").exists()


def test_cifar_reader_refuses_nested_label_lists_and_cleans_class_names(tmp_path):
    nested = []
    for _ in range(40):  # 2**40 items if walked: shared references, a few hundred bytes on disk
        nested = [nested, nested]
    (tmp_path / "b").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": nested}))
    with pytest.raises(UsageError, match="'labels' is not a list of integers"):
        formats.read_cifar_batches([tmp_path / "b"], "labels")
    (tmp_path / "meta").write_bytes(pickle.dumps({"label_names": ["cat\x1b[2J", b"dog\n"]}))
    assert formats.read_cifar_meta(tmp_path / "meta", "label_names") == ["cat?[2J", "dog?"]


def test_idx_reader_reads_only_what_the_header_announces(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.ones((2, 4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes() + b"\0" * 1000)  # trailing data is ignored, not loaded
    assert formats.read_idx(path).shape == (2, 4, 4)
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2**31 - 1, 2**31 - 1, 2**31 - 1) + b"\0" * 10
    path.write_bytes(huge)  # a header claiming ~10**28 bytes: a one-line error, no allocation
    with pytest.raises(UsageError, match="truncated IDX file"):
        formats.read_idx(path)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    _image_folder(tmp_path / "d" / "train")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 12x10 images are 120 pixels
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match=r"0\.png: image of 12 x 10 pixels is larger than the limit of 100"):
            data.load(cfg(dataset="imagefolder", data=str(tmp_path / "d")))
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # over twice the limit: Pillow's own error
    with pytest.raises(UsageError, match="image of 120 pixels is larger than the limit of 50"):
        formats.open_image(tmp_path / "d" / "train" / "cat" / "0.png")


@pytest.mark.parametrize("name,kind,link,reason", [
    ("tree/a.png", tarfile.REGTYPE, "", None),
    ("tree/alias.png", tarfile.SYMTYPE, "a.png", None),
    ("tree/sub/alias", tarfile.SYMTYPE, "deeper/x", None),
    ("../x", tarfile.REGTYPE, "", "'..'"),
    ("tree/../../x", tarfile.REGTYPE, "", "'..'"),
    ("/etc/x", tarfile.REGTYPE, "", "absolute"),
    ("tree/up", tarfile.SYMTYPE, "..", "links to"),
    ("tree/up", tarfile.SYMTYPE, "sub/../..", "links to"),
    ("tree/etc", tarfile.SYMTYPE, "/etc", "links to"),
    ("tree/hard", tarfile.LNKTYPE, "../outside", "links to"),
    ("tree/dev", tarfile.CHRTYPE, "", "special file"),
])
def test_tar_members_that_could_leave_the_folder_are_refused(name, kind, link, reason):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    found = archive.unsafe_member(info)
    assert (found is None) if reason is None else (reason in found and repr(name) in found)


def test_cifar_download_refuses_an_archive_with_escaping_members(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    monkeypatch.setattr(sources.CIFAR10.tv_class, "tgz_md5", hashlib.md5(buf.getvalue()).hexdigest())
    with pytest.raises(UsageError, match="--download .*refused to extract: member '../escaped.txt'"):
        data.load(cfg(dataset="cifar10", data=str(tmp_path / "dl"), download=True))
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_extract_tar_with_and_without_pythons_data_filter(tmp_path, monkeypatch, has_data_filter):
    if not has_data_filter:  # Python before 3.11.4 / 3.10.12: the member checks alone must hold
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    _image_folder(tmp_path / "src" / "train")
    with tarfile.open(tmp_path / "ok.tar", "w") as tar:
        tar.add(tmp_path / "src", arcname="tree")
    archive.extract_tar(tmp_path / "ok.tar", tmp_path / "out", "--data")
    assert (tmp_path / "out" / "tree" / "train" / "cat" / "0.png").is_file()
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        tar.add(tmp_path / "src", arcname="tree")
        info = tarfile.TarInfo("tree/../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UsageError, match=r"--data .*bad.tar: refused to extract: member 'tree/\.\./\.\./escaped.txt'"):
        archive.extract_tar(tmp_path / "bad.tar", tmp_path / "out2", "--data")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out2").exists()
