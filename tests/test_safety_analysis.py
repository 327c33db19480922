"""The analysis commands (plot, report, compare, montage, roofline) never lose a user's files: an
output that is an input is refused, names from the logs stay inside --out, a read-only folder and
every bad file or flag end as one line. Table-driven with tests/safety.py's checksums."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image

import safety
from safety import Case
from test_analysis import make_run

NCU = Path(__file__).parent / "fixtures" / "ncu-details-small.csv"
PEAKS = ["--peak-compute", "10", "--peak-bw", "1000"]
A, B = "../../runs/A", "../../runs/B"


# --- setups: each writes run files directly (no training), relative to the test's root ---------

def _runs(root: Path) -> None:
    for name, lr in (("A", 0.1), ("B", 0.2)):
        run = make_run(root / "runs", name)
        (run / "config.yaml").write_text(f"model: fast\nlr: {lr}\n")
        (run / "env.json").write_text('{"device_name": "Test GPU"}')


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# Metric keys a copied or edited log may hold: each must become one safe file inside --out.
NASTY_KEYS = ["../../evil", "a/b", "a_b", "A_B", "x\ny", "summary", "curve_loss", "", ".hidden", "$\\frac{$", "..",
              "/abs/path"]


def _nasty_keys(root: Path) -> None:
    rows = [{"t": 100 + i, "phase": "train", "power_w": 10.0 + i, **{k: float(i + j) for j, k in enumerate(NASTY_KEYS)}}
            for i in range(3)]
    _jsonl(root / "runs" / "N" / "telemetry" / "train_epoch.jsonl", rows)
    _jsonl(root / "runs" / "N" / "metrics.jsonl", [{"epoch": 1, "phase": "val", "loss": 1.0, "top1": 0.5}])


def _huge_values(root: Path) -> None:
    _jsonl(root / "runs" / "H" / "metrics.jsonl",
           [{"t": 1, "epoch": 1, "step": 1, "phase": "train", "loss": 1e308, "top1": 0.5},
            {"t": 2, "epoch": 2, "step": 2, "phase": "train", "loss": -1e308, "top1": 0.6},
            {"t": 3, "epoch": 2, "step": 2, "phase": "val", "loss": 1e300, "top1": 0.6, "top5": 1.0}])
    _jsonl(root / "runs" / "H" / "telemetry" / "train_epoch.jsonl",
           [{"t": 1, "phase": "train", "device": "cpu", "power_w": 1e308}, {"t": 2, "phase": "train",
                                                                            "device": "cpu", "power_w": 5.0}])


def _dollar_label(root: Path) -> None:
    make_run(root / "runs", "r$\\bad{$")  # a folder name that is matplotlib maths notation


# Fields that change type between rows: a number, then text, "nan", an object, a list.
MIXED_METRICS = [
    {"t": 1, "epoch": 1, "phase": "train", "loss": 0.5, "top1": 0.3, "top5": 0.8, "lr": 0.1, "images": 100,
     "seconds": 1.0, "energy_j": 5.0},
    {"t": 2, "epoch": "1", "phase": "val", "loss": "nan", "top1": 0.4, "top5": "abc", "energy_j": {"a": 1}},
    {"t": 3, "epoch": 2, "phase": "train", "loss": "abc", "top1": {"a": 1}, "lr": [0.1], "images": "many",
     "seconds": True},
    {"t": 4, "epoch": "two", "phase": 7, "loss": [1, 2], "top1": "0.9"},
    {"t": 5, "epoch": 2, "phase": "val", "loss": 0.25, "top1": 0.45, "top5": 0.9, "energy_j": 6.0},
    "NaN",
    '{"t": 6, "epoch": 3, "phase": "val", "loss": NaN, "top1": Infinity}',
]
MIXED_TELEMETRY = [
    {"t": 100, "phase": "train", "device": "cuda:0", "power_w": 100.0, "gpu_util_pct": 50, "epoch": 1, "step": 1},
    {"t": "101", "phase": {"x": 1}, "device": 0, "power_w": "N/A", "gpu_util_pct": "55", "epoch": "one"},
    {"t": {"a": 1}, "phase": "train", "power_w": 120.0},
    {"t": 102.5, "phase": "val", "device": "cuda:0", "power_w": [1], "gpu_util_pct": {"a": 1}, "step": [3]},
    {"t": 103, "phase": "val", "device": "cuda:0", "power_w": 130.0, "gpu_util_pct": 60.0},
]


def _mixed(root: Path) -> None:
    run = root / "runs" / "M"
    _jsonl(run / "metrics.jsonl", MIXED_METRICS)
    _jsonl(run / "telemetry" / "train_epoch.jsonl", MIXED_TELEMETRY)
    (run / "test.json").write_text('{"test": {"split": "test", "top1": "abc", "top5": 0.9, "loss": null}}')
    make_run(root / "runs", "A")


def _all_objects(root: Path) -> None:
    # Every value an object: no type change, so Arrow's fast reader takes it as a struct column.
    _jsonl(root / "runs" / "O" / "metrics.jsonl",
           [{"epoch": {"n": 1}, "phase": "val", "loss": {"v": 1}, "top1": {"v": 0.5}} for _ in range(3)])
    make_run(root / "runs", "A")


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def _garbage_run_files(config: str | bytes, env: str | bytes = "{}", test: str | bytes = "{}"):
    def setup(root: Path) -> None:
        _runs(root)
        for name, text in (("config.yaml", config), ("env.json", env), ("test.json", test)):
            path = root / "runs" / "A" / name
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _empty_run(root: Path) -> None:
    _runs(root)
    (root / "runs" / "E").mkdir(parents=True)
    (root / "runs" / "E" / "metrics.jsonl").write_text("")
    (root / "runs" / "E" / "config.yaml").write_text("model: fast\n")


def _not_a_run(root: Path) -> None:
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run\n")


def _fifo(root: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("this system has no named pipes")
    os.mkfifo(root / "pipe.jsonl")


def _deep_line(root: Path) -> None:
    _runs(root)
    with open(root / "runs" / "A" / "metrics.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")  # deeper than Python's json parser goes


def _ncu(edit=lambda text: text, name: str = "k.csv"):
    def setup(root: Path) -> None:
        (root / name).write_text(edit(NCU.read_text(encoding="utf-8-sig")), encoding="utf-8")
    return setup


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes: what a decompression bomb
    looks like until it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _pics(root: Path, extra: dict[str, bytes] | None = None) -> None:
    pics = root / "pics"
    pics.mkdir(exist_ok=True)
    for i, size in enumerate([(60, 40), (80, 50)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(pics / f"p{i}.png")
    for name, data in (extra or {}).items():
        (pics / name).write_bytes(data)


def _pics_with(extra: dict[str, bytes]):
    return lambda root: _pics(root, extra)


def _tall_pics(root: Path) -> None:
    # Narrow and tall: scaled to 10000 pixels wide, each would be 10000x2000000.
    _pics(root)
    for i in range(2):
        Image.new("RGB", (10, 2000), "white").save(root / "pics" / f"tall{i}.png")


def _pics_and_own_montage(root: Path) -> None:
    from nnperf.analysis.montage import montage

    _pics(root)
    montage(root / "pics", root / "pics" / "montage.png")  # an earlier `nnperf montage pics`


def _pics_and_users_montage_png(root: Path) -> None:
    _pics(root)
    Image.new("RGB", (30, 30), "red").save(root / "pics" / "montage.png")  # the user's own picture


def _link_to_input(root: Path) -> None:
    _runs(root)
    (root / "work" / "here").mkdir(parents=True, exist_ok=True)
    (root / "work" / "here" / "r.html").symlink_to(root / "runs" / "A" / "metrics.jsonl")


def _plain_file_and_folder(root: Path) -> None:
    _runs(root)
    (root / "afile").write_text("keep me\n")
    (root / "adir").mkdir()


def _both(*setups):
    def setup(root: Path) -> None:
        for s in setups:
            s(root)
    return setup


# --- read-only folders: a read-only tmpfs for root (who ignores permission bits), else chmod ----

_UNDO: list[tuple[str, Path]] = []


def _read_only(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        _UNDO.append(("chmod", folder))
        return
    if shutil.which("mount") is None:
        pytest.skip("running as root (permission bits do not stop root) and there is no `mount` for a "
                    "read-only tmpfs")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip("running as root (permission bits do not stop root) and mounting a tmpfs is not permitted "
                    f"here: {made.stderr.strip()}")
    _UNDO.append(("mount", folder))
    ro = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
    if ro.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only here: {ro.stderr.strip()}")


@pytest.fixture(autouse=True)
def _undo_read_only():
    yield
    while _UNDO:
        how, folder = _UNDO.pop()
        if how == "mount":
            subprocess.run(["umount", str(folder)], check=False, capture_output=True)
        else:
            folder.chmod(0o755)


def _runs_and_read_only(root: Path) -> None:
    _runs(root)
    _pics(root)
    _ncu()(root)
    _read_only(root / "ro")


ROOF = ["roofline", "../../k.csv", *PEAKS]

CASES = [
    # Outputs that are inputs: refused before anything is written.
    Case("overwrite-compare-csv-is-metrics", ["compare", A, B, "--csv", f"{A}/metrics.jsonl"], 2,
         ("--csv", "metrics.jsonl", "one of the inputs"), setup=_runs),
    Case("overwrite-compare-csv-is-config", ["compare", A, B, "--csv", f"{B}/config.yaml"], 2,
         ("--csv", "config.yaml", "one of the inputs"), setup=_runs),
    Case("overwrite-compare-csv-is-telemetry", ["compare", A, "--csv", f"{A}/telemetry/val_epoch.jsonl"], 2,
         ("--csv", "val_epoch.jsonl", "one of the inputs"), setup=_runs),
    Case("overwrite-report-out-is-metrics", ["report", A, "--out", f"{A}/metrics.jsonl"], 2,
         ("--out", "metrics.jsonl", "one of the inputs"), setup=_runs),
    Case("overwrite-report-out-is-env", ["report", A, B, "--out", f"{B}/env.json"], 2,
         ("--out", "env.json", "one of the inputs"), setup=_runs),
    Case("overwrite-report-out-is-a-given-file", ["report", f"{A}/metrics.jsonl", "--out", f"{A}/metrics.jsonl"],
         2, ("--out", "metrics.jsonl", "one of the inputs"), setup=_runs),
    Case("overwrite-report-out-links-to-an-input", ["report", A, "--out", "r.html"], 2,
         ("--out", "r.html", "one of the inputs"), setup=_link_to_input),
    Case("overwrite-plot-beside-the-logs", ["plot", f"{A}/metrics.jsonl", "--out", A], 0,
         may_change=("runs/A/*.png", "runs/A/summary.csv"), setup=_runs),
    Case("overwrite-plot-file-onto-an-input-folder", ["plot", "../../curve_loss.png", "--out", "../.."], 2,
         ("--out", "curve_loss.png", "one of the inputs"), setup=lambda root: make_run(root, "curve_loss.png")),
    Case("overwrite-roofline-out-is-the-export", [*ROOF, "--out", "../../k.csv"], 2,
         ("--out", "k.csv", "one of the inputs"), setup=_ncu()),
    Case("overwrite-roofline-summary-is-the-export", [*ROOF, "--out", "r.png", "--summary", "../../k.csv"], 2,
         ("--summary", "k.csv", "one of the inputs"), setup=_ncu()),
    Case("overwrite-roofline-default-summary-is-the-export", [*ROOF, "--out", "../../k.png"], 2,
         ("--summary", "k.csv", "one of the inputs"), setup=_ncu()),
    Case("overwrite-roofline-summary-is-the-plot", [*ROOF, "--out", "r.csv"], 2,
         ("--summary", "r.csv", "same file as --out"), setup=_ncu()),
    Case("overwrite-montage-out-is-an-image", ["montage", "../../pics", "--out", "../../pics/p1.png"], 2,
         ("--out", "p1.png", "one of the images"), setup=_pics),
    Case("overwrite-montage-default-is-the-users-picture", ["montage", "../../pics"], 2,
         ("montage.png", "one of the images", "--out"), setup=_pics_and_users_montage_png),
    Case("overwrite-montage-replaces-its-own-montage", ["montage", "../../pics"], 0,
         may_change=("pics/montage.png",), setup=_pics_and_own_montage),

    # Names that come from the data become safe file names inside --out, and figures still draw.
    Case("names-plot-metric-keys-stay-inside-out", ["plot", "../../runs/N", "--out", "../../out"], 0,
         may_change=("out/*",), setup=_nasty_keys),
    Case("names-report-metric-keys", ["report", "../../runs/N", "--out", "../../n.html"], 0,
         may_change=("n.html",), setup=_nasty_keys),
    Case("names-plot-run-label-is-maths-notation", ["plot", "../../runs/r$\\bad{$", "--out", "../../out"], 0,
         may_change=("out/*",), setup=_dollar_label),
    Case("names-roofline-kernel-and-label-are-maths-notation",
         [*ROOF, "--out", "../../r.png", "--label", "$\\bad{"], 0, may_change=("r.png", "r.csv"),
         setup=_ncu(lambda t: t.replace("void saxpy_like<float>", "void saxpy_$\\bad{$<float>"))),

    # A read-only output folder: one line naming the file, exit 1.
    Case("environment-plot-out-read-only", ["plot", A, "--out", "../../ro"], 1, ("ro/", "choose"),
         setup=_runs_and_read_only),
    Case("environment-plot-out-below-read-only", ["plot", A, "--out", "../../ro/plots"], 1, ("ro/plots", "choose"),
         setup=_runs_and_read_only),
    Case("environment-report-out-read-only", ["report", A, "--out", "../../ro/r.html"], 1, ("ro/r.html", "choose"),
         setup=_runs_and_read_only),
    Case("environment-compare-csv-read-only", ["compare", A, B, "--csv", "../../ro/c.csv"], 1,
         ("ro/c.csv", "choose"), setup=_runs_and_read_only),
    Case("environment-montage-out-read-only", ["montage", "../../pics", "--out", "../../ro/m.png"], 1,
         ("ro/m.png", "choose"), setup=_runs_and_read_only),
    Case("environment-roofline-out-read-only", [*ROOF, "--out", "../../ro/r.png"], 1, ("ro/r.", "choose"),
         setup=_runs_and_read_only),

    # Output paths of the wrong kind.
    Case("input-compare-csv-is-a-folder", ["compare", A, "--csv", "../../adir"], 2,
         ("--csv", "adir", "is a folder", "file name"), setup=_plain_file_and_folder),
    Case("input-plot-out-is-a-file", ["plot", A, "--out", "../../afile"], 2,
         ("--out", "afile", "is a file", "folder"), setup=_plain_file_and_folder),
    Case("input-plot-out-below-a-file", ["plot", A, "--out", "../../afile/plots"], 2,
         ("--out", "afile", "not a folder"), setup=_plain_file_and_folder),
    Case("input-report-out-is-a-folder", ["report", A, "--out", "../../adir"], 2,
         ("--out", "adir", "is a folder", "file name"), setup=_plain_file_and_folder),
    Case("input-montage-out-is-a-folder", ["montage", "../../pics", "--out", "../../adir"], 2,
         ("--out", "adir", "is a folder"), setup=_both(_plain_file_and_folder, _pics)),
    Case("input-roofline-out-is-a-folder", [*ROOF, "--out", "../../adir"], 2, ("--out", "adir", "is a folder"),
         setup=_both(_plain_file_and_folder, _ncu())),

    # Values too large to draw (a hand-edited 1e308) are absent, not an overflow in the axis ticks.
    Case("input-plot-values-too-large-to-draw", ["plot", "../../runs/H", "--out", "../../out"], 0,
         may_change=("out/*",), setup=_huge_values),
    Case("input-report-values-too-large-to-draw", ["report", "../../runs/H", "--out", "../../h.html"], 0,
         may_change=("h.html",), setup=_huge_values),
    # Logs whose fields change type between rows, and garbage beside them.
    Case("input-plot-fields-change-type", ["plot", "../../runs/M", "--out", "../../out"], 0,
         may_change=("out/*",), setup=_mixed),
    Case("input-report-fields-change-type", ["report", "../../runs/M", "--out", "../../m.html"], 0,
         may_change=("m.html",), setup=_mixed),
    Case("input-compare-fields-change-type", ["compare", "../../runs/M", "../../runs/A"], 0, setup=_mixed),
    Case("input-report-two-runs-fields-change-type",
         ["report", "../../runs/M", "../../runs/A", "--out", "../../m.html"], 0, may_change=("m.html",), setup=_mixed),
    Case("input-plot-every-value-an-object", ["plot", "../../runs/O", "--out", "../../out"], 0,
         may_change=("out/*",), setup=_all_objects),
    Case("input-compare-every-value-an-object", ["compare", "../../runs/O", "../../runs/A"], 0, setup=_all_objects),
    Case("input-report-line-nested-too-deep", ["report", A, "--out", "../../r.html"], 0, may_change=("r.html",),
         setup=_deep_line),
    Case("input-report-run-files-not-mappings", ["report", A, B, "--out", "../../r.html"], 0, may_change=("r.html",),
         setup=_garbage_run_files("- a\n- b\n", env="[1, 2]", test='"passed"')),
    Case("input-compare-run-files-not-mappings", ["compare", A, B], 0,
         setup=_garbage_run_files("just text", env="null", test="[1]")),
    Case("input-report-run-files-binary-garbage", ["report", A, "--out", "../../r.html"], 0, may_change=("r.html",),
         setup=_garbage_run_files(b"\xff\xfe\x00garbage: [", env=b"\x89PNG\x00", test=b"{\"test\": ")),
    Case("input-compare-config-alias-bomb", ["compare", A, B], 0, setup=_garbage_run_files(BILLION_LAUGHS)),
    Case("input-report-config-odd-keys", ["report", A, B, "--out", "../../r.html"], 0, may_change=("r.html",),
         setup=_garbage_run_files("1: one\nnull: none\n2024-01-01: date\nnested: {3: x, b: 2024-01-02}\n"
                                  "cycle: &c [*c]\n")),
    Case("input-compare-test-json-bad-numbers", ["compare", A, B], 0,
         setup=_garbage_run_files("model: fast\n", test='{"test": {"top1": "abc"}, "val": {"top1": [1]}, "x": 3}')),

    # Nothing to analyse.
    Case("input-compare-a-run-without-rows", ["compare", A, "../../runs/E"], 2,
         ("nothing to compare", "runs/E", "no metrics"), setup=_empty_run),
    Case("input-compare-only-empty-runs", ["compare", "../../runs/E"], 2, ("nothing to compare", "runs/E"),
         setup=_empty_run),
    Case("input-plot-a-run-without-rows", ["plot", "../../runs/E", "--out", "../../out"], 2,
         ("runs/E", "no rows"), setup=_empty_run),
    Case("input-report-a-run-without-rows", ["report", "../../runs/E", "--out", "../../r.html"], 2,
         ("runs/E", "no rows"), setup=_empty_run),
    Case("input-plot-not-a-run-directory", ["plot", "../../notes", "--out", "../../out"], 2,
         ("notes", "run directory"), setup=_not_a_run),
    Case("input-report-not-a-run-directory", ["report", "../../notes"], 2, ("notes", "run directory"),
         setup=_not_a_run),
    Case("input-compare-not-a-run-directory", ["compare", "../../notes"], 2, ("notes", "run directory"),
         setup=_not_a_run),
    Case("input-plot-a-named-pipe", ["plot", "../../pipe.jsonl", "--out", "../../out"], 2,
         ("pipe.jsonl", "not a regular file"), setup=_fifo),

    # roofline: peaks and counters.
    Case("input-roofline-peak-bw-huge", ["roofline", "../../k.csv", "--peak-compute", "10", "--peak-bw", "1e308"], 2,
         ("--peak-bw", "1e+09 GB/s"), setup=_ncu()),
    Case("input-roofline-peak-compute-huge", ["roofline", "../../k.csv", "--peak-compute", "1e308", "--peak-bw", "1"],
         2, ("--peak-compute", "1e+06 TFLOP/s"), setup=_ncu()),
    Case("input-roofline-peak-compute-inf", ["roofline", "../../k.csv", "--peak-compute", "inf", "--peak-bw", "1"],
         2, ("--peak-compute", "inf"), setup=_ncu()),
    Case("input-roofline-peak-bw-nan", ["roofline", "../../k.csv", "--peak-compute", "10", "--peak-bw", "nan"], 2,
         ("--peak-bw", "nan"), setup=_ncu()),
    Case("input-roofline-peak-bw-negative", ["roofline", "../../k.csv", "--peak-compute", "10", "--peak-bw", "-5"], 2,
         ("--peak-bw", "positive"), setup=_ncu()),
    Case("input-roofline-tensor-flops-nan", [*ROOF, "--tensor-flops-per-inst", "nan"], 2,
         ("--tensor-flops-per-inst",), setup=_ncu()),
    Case("input-roofline-negative-counter", ROOF, 2, ("k.csv", "kernel 0", "saxpy_like", "dram__bytes.sum", "-1e+06"),
         setup=_ncu(lambda t: t.replace('"1,000,000.00"', '"-1,000,000.00"'))),
    Case("input-roofline-infinite-counter", ROOF, 2, ("k.csv", "kernel 0", "gpu__time_duration.sum", "inf"),
         setup=_ncu(lambda t: t.replace('"ns","2,000"', '"ns","inf"'))),
    Case("input-roofline-nan-counter", ROOF, 2, ("k.csv", "kernel 1", "smsp__inst_executed_pipe_tensor.sum", "nan"),
         setup=_ncu(lambda t: t.replace('"inst","100"', '"inst","nan"'))),
    Case("input-roofline-zero-clock", ROOF, 2, ("k.csv", "kernel 1", "per_second", "0"),
         setup=_ncu(lambda t: t.replace('"1,500,000,000.00"', '"0"'))),
    Case("input-roofline-counter-overflows", ROOF, 2, ("k.csv", "kernel 1", "too large"),
         setup=_ncu(lambda t: t.replace('"inst","100"', '"inst","1e306"'))),
    Case("input-roofline-details-page-without-value-column", ROOF, 2, ("k.csv", "Metric Value"),
         setup=_ncu(lambda t: t.replace('"Metric Value"', '"Value"'))),

    # montage: decompression bombs are refused from the header, before decoding.
    Case("input-montage-decompression-bomb", ["montage", "../../pics", "--out", "../../m.png"], 2,
         ("bomb.png", "decompression bomb"), setup=_pics_with({"bomb.png": _png_header(100_000, 100_000)})),
    Case("input-montage-just-over-the-pixel-limit", ["montage", "../../pics", "--out", "../../m.png"], 2,
         ("big.png", "10000x9000", "decompression bomb"), setup=_pics_with({"big.png": _png_header(10_000, 9_000)})),
    Case("input-montage-grid-too-large", ["montage", "../../pics", "--out", "../../m.png", "--width", "10000",
                                          "--cols", "1"], 2, ("--width", "pixels"),
         setup=_tall_pics),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_safety_analysis(run_cli, tmp_path, case):
    safety.check(run_cli, tmp_path, case)


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def test_safety_names_each_metric_key_gets_its_own_file_inside_out(run_cli, tmp_path):
    safety.check(run_cli, tmp_path, _case("names-plot-metric-keys-stay-inside-out"))
    out = tmp_path / "out"
    written = sorted(p.name for p in out.rglob("*"))
    assert all(p.parent == out and p.is_file() for p in out.rglob("*")), written  # no subfolder, nothing outside
    metrics = len(NASTY_KEYS) + 1  # and power_w
    assert {"curve_loss.png", "curve_top1.png", "curve_loss-2.png", "summary-2.csv"} <= set(written), written
    assert len([n for n in written if n.endswith(".png")]) == metrics + 2, written  # + the two real curves
    assert len([n for n in written if n.endswith(".csv")]) == metrics + 1, written  # + summary.csv
    assert not any(n.startswith(".") or "\n" in n for n in written), written
    summary = (out / "summary.csv").read_text()
    assert summary.startswith("run,") and "../../evil_mean" in summary  # the table keeps the real key


def test_safety_input_mixed_types_are_absent_not_fatal(run_cli, tmp_path):
    safety.check(run_cli, tmp_path, _case("input-report-fields-change-type"))
    page = (tmp_path / "m.html").read_text()
    assert "TEST (test) top1=- top5=0.900 loss=-" in page  # "abc" in test.json is shown as '-'
    assert "FINAL top1 0.450" in page  # the best numeric validation top-1; "0.9" came in a non-text phase row
    code, out, err = run_cli("compare", tmp_path / "runs" / "M", tmp_path / "runs" / "A")
    assert code == 0 and "final top-1" in out, err
