"""The `nnperf` command: parses flags, calls one function per subcommand, turns errors into one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys

from . import config as configs
from .errors import Diverged, EnvError, Interrupted, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML preset; flags given here override it")
    by_name = {f.name: f for f in configs.fields()}
    for f in by_name.values():
        p.add_argument(configs.flag_name(f.name), **_flag_kwargs(f, f.metadata["help"]))
    for old, new in configs.RENAMED.items():  # deprecated spellings: still accepted, not in --help
        p.add_argument(configs.flag_name(old), **_flag_kwargs(by_name[new], argparse.SUPPRESS))


def _flag_kwargs(f, help: str) -> dict:
    """add_argument's arguments for config field `f`: its type, or --NAME/--no-NAME for a bool."""
    meta = f.metadata
    kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help}
    if meta["kind"] is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = meta["kind"]
        kwargs["metavar"] = f.name.upper() if not meta["choices"] else "{" + ",".join(meta["choices"]) + "}"
    if f.name == "pretrained":  # --pretrained alone: the library's weights; --pretrained FILE: a file
        kwargs.update(nargs="?", const="default", metavar="FILE")
    return kwargs


def _parser() -> Parser:
    root = Parser(prog="nnperf", description="Train image classifiers and see what the hardware did.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = sub.add_parser("train", help="train a model; writes a run directory")
    _add_config_flags(train)
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train in N processes on this node (torchrun's launcher, DistributedDataParallel); "
                            "--batch-size stays the global batch")
    train.add_argument("--max-restarts", type=int, default=0, metavar="K",
                       help="with --nproc: restart the processes up to K times after one fails, resuming from "
                            "the last saved position (default 0)")
    test = sub.add_parser("test", help="re-evaluate a run's best checkpoint")
    test.add_argument("run_dir", metavar="RUN_DIR")
    test.add_argument("--checkpoint", metavar="PATH", help="evaluate this checkpoint instead of best.pt")
    test.add_argument("--split", help="train, val or test (default: the split training evaluated on)")
    test.add_argument("--device", help="device to evaluate on (default: the run's)")
    test.add_argument("--tta", type=int, choices=(0, 1, 2), help="test-time augmentation level (default: the run's)")
    pred = sub.add_parser("predict", help="classify image files with a checkpoint")
    pred.add_argument("checkpoint", metavar="CHECKPOINT")
    pred.add_argument("images", metavar="IMAGE", nargs="+")
    pred.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    pred.add_argument("--json", action="store_true", help="print JSON instead of text")
    pred.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    sub.add_parser("devices", help="accelerators, and the telemetry each can record")
    plot = sub.add_parser("plot", help="telemetry and training curves -> PNG + CSV per metric, summary table")
    plot.add_argument("paths", metavar="RUN_DIR|FILE.jsonl", nargs="+")
    plot.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/plots for one run, else plots)")
    plot.add_argument("--metrics", metavar="A,B", help="only these telemetry metrics (default: every one present)")
    montage = sub.add_parser("montage", help="the PNGs of a folder stitched into one labelled grid")
    montage.add_argument("folder", metavar="DIR")
    montage.add_argument("--cols", type=int, default=3, help="images per row (default 3)")
    montage.add_argument("--out", metavar="FILE.png", help="output image (default DIR/montage.png)")
    montage.add_argument("--width", type=int, help="pixels per cell (default: the widest image)")
    compare = sub.add_parser("compare", help="runs side by side: results, time, energy, config keys that differ")
    compare.add_argument("paths", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--csv", metavar="FILE.csv", help="also write the table as CSV")
    report = sub.add_parser("report", help="one self-contained HTML report for one or more runs")
    report.add_argument("paths", metavar="RUN_DIR", nargs="+")
    report.add_argument("--out", metavar="FILE.html", help="default: RUN_DIR/report.html for one run, else report.html")
    _add_roofline(sub)
    _add_perf_commands(sub)
    sweep = sub.add_parser("sweep", help="Optuna hyperparameter sweep over a YAML search space")
    sweep.add_argument("spec", metavar="SPEC.yaml")
    sweep.add_argument("--trials", type=int, help="run at most this many trials in this worker (default: until "
                                                  "the study has none left)")
    sweep.add_argument("--storage", metavar="URL", help="SQLAlchemy URL shared by all workers, e.g. "
                                                        "postgresql://user@host/db (default: SQLite in the folder)")
    sweep.add_argument("--study", metavar="NAME", help="study name (default: the spec's study, else its file name)")
    sweep.add_argument("--out-dir", metavar="DIR", help="folder for the trials' runs (default sweeps/STUDY)")
    sweep.add_argument("--show", action="store_true", help="only print the results table")
    data = sub.add_parser("data", help="inspect a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    show = data_sub.add_parser("show", help="counts per class and a grid of sample images")
    show.add_argument("--dataset", required=True, help="cifar10, cifar100, fashion-mnist, mnist, imagefolder, ...")
    show.add_argument("--data", metavar="DIR", help="where the dataset's files are")
    show.add_argument("--out", metavar="FILE.png", default="samples.png", help="grid image (default samples.png)")
    show.add_argument("--per-class", type=int, default=8, help="samples per class (default 8)")
    show.add_argument("--seed", type=int, default=0, help="which samples (default 0)")
    return root


def _add_roofline(sub) -> None:
    """`nnperf roofline`: a run's step (or one timed here) or an Nsight Compute export on a roof."""
    roof = sub.add_parser("roofline", help="a run's training step (RUN_DIR, or --model timed here) or the kernels of "
                                           "an Nsight Compute CSV on a roofline (PNG) + summary CSV")
    roof.add_argument("source", metavar="FILE.csv|RUN_DIR", nargs="?",
                      help="an `ncu --csv` export (details or raw page), or a run directory")
    roof.add_argument("--model", help="without RUN_DIR: time this model's training step here and place it")
    roof.add_argument("--batch-size", type=int, default=128, help="with --model: the batch (default 128)")
    roof.add_argument("--dataset", default="cifar10", help="with --model: the input shape (default cifar10)")
    roof.add_argument("--precision", choices=configs.PRECISIONS, help="with --model: default the device's best")
    roof.add_argument("--device", default="auto", help="with --model: where to time it (default auto)")
    roof.add_argument("--ncu", metavar="FILE.csv", help="with RUN_DIR or --model: also draw these Nsight kernels")
    roof.add_argument("--peak-compute", type=float, metavar="TFLOPS",
                      help="peak TFLOP/s (needed for a CSV; default for a step: nnperf peak's measurement)")
    roof.add_argument("--peak-bw", type=float, metavar="GBPS",
                      help="peak DRAM bandwidth, GB/s (needed for a CSV; default for a step: nnperf peak's)")
    roof.add_argument("--label", help="device or experiment name for the title")
    roof.add_argument("--out", metavar="FILE.png", help="plot (default roofline.png; RUN_DIR/plots/roofline.png)")
    roof.add_argument("--summary", metavar="FILE.csv", help="per-kernel summary CSV (default: beside the plot)")
    roof.add_argument("--tensor-flops-per-inst", type=float, default=4096, metavar="N",
                      help="FLOPs per tensor-pipe warp instruction (default 4096: a 16x8x16 MMA)")


def _add_perf_commands(sub) -> None:
    """`nnperf bench`, `peak` and `profile`: the performance lab (nnperf.perf)."""
    bench = sub.add_parser("bench", help="eager vs compile vs trace vs script vs export: forward and training-step "
                                         "timings of one or more models")
    bench.add_argument("--model", default="small_cifar", metavar="M[,M2...]", help="models (default small_cifar)")
    bench.add_argument("--dataset", default="cifar10", help="the batches' shape: channels, size, classes "
                                                            "(default cifar10)")
    bench.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    bench.add_argument("--precision", choices=configs.PRECISIONS, help="default: the device's best")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory layout (default: the device's choice)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, xpu or mps")
    bench.add_argument("--modes", default="eager,compile,trace,script,export", metavar="A,B",
                       help="of eager, compile, trace, script, export (default: all)")
    bench.add_argument("--what", default="forward,step", metavar="A,B", help="forward, step or both (default)")
    bench.add_argument("--conv-impl", default="torch", metavar="A,B",
                       help="convnet3's convolution: torch, handmade or both (default torch)")
    bench.add_argument("--width", type=int, help="base channel count of the models (default: each model's own)")
    bench.add_argument("--image-size", type=int, help="image side instead of the dataset's (default: the dataset's)")
    bench.add_argument("--min-time", type=float, default=1.0, metavar="S",
                       help="seconds of timing per measurement at least (default 1); timing goes on, up to 5x "
                            "that, until the IQR is under 5%% of the median")
    bench.add_argument("--out", metavar="DIR", help="table as CSV + JSON here (default bench/<models>)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    bench.add_argument("--policy", action="store_true",
                       help="time the precision x memory-format candidates instead (what the default path chooses)")
    peak = sub.add_parser("peak", help="this device's measured peak FLOP/s (matmul, 3x3 conv) and memory bandwidth")
    peak.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, xpu or mps")
    peak.add_argument("--dtypes", default="fp32,bf16,fp16", metavar="A,B",
                      help="of fp32, bf16, fp16 (default: all three, where the device runs them)")
    peak.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    peak.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    profile = sub.add_parser("profile", help="warm up, then capture exactly one training step (NVTX ranges for "
                                             "Nsight, torch.profiler trace and tables in RUN/profile/); "
                                             "--resume RUN/checkpoints/last.pt profiles an existing run")
    _add_config_flags(profile)
    profile.add_argument("--warmup-iters", type=int, default=20, metavar="N", help="steps before the capture "
                                                                                 "(default 20)")
    profile.add_argument("--nproc", type=int, metavar="N",
                         help="profile the step of N processes on this node (torchrun's launcher, DDP): the "
                              "capture shows the gradients' all-reduce; rank 0 writes RUN/profile/")
    profile.add_argument("--profile-iter", type=int, default=1, metavar="K",
                         help="which step after the warm-up to capture (default 1: the first)")


def cmd_bench(ns: argparse.Namespace) -> int:
    from .perf import bench

    return bench.run(ns)


def cmd_peak(ns: argparse.Namespace) -> int:
    from .perf import peak

    return peak.run(ns)


def cmd_profile(ns: argparse.Namespace) -> int:
    from .perf import profile

    return profile.run(ns)


def cmd_montage(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis.montage import montage

    out, n = montage(ns.folder, ns.out or Path(ns.folder) / "montage.png", ns.cols, ns.width)
    print(f"wrote {out} ({n} images, {min(ns.cols, n)} per row)")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from .analysis import compare, logs, outputs

    srcs = logs.sources(ns.paths)
    if ns.csv:  # checked before the work, so a bad path costs nothing and replaces nothing
        outputs.file_target("--csv", ns.csv, outputs.read_paths(srcs, ns.paths), example="compare.csv")
    frame, differ = compare.side_by_side(srcs)
    print(compare.format_table(frame))
    if not differ:
        print("\n(the configs are identical)")
    if ns.csv:
        outputs.write_with(ns.csv, lambda tmp: frame.to_csv(tmp, index_label="field"))
        print(f"wrote {ns.csv}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis.report import write_report

    one = Path(ns.paths[0])
    out = ns.out or (str(one / "report.html") if len(ns.paths) == 1 and one.is_dir() else "report.html")
    print(f"wrote {write_report(ns.paths, out)}")
    return 0


def cmd_roofline(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis import outputs, roofline

    # Bounds far beyond any device, so that a typo (1e308, inf, nan) is one line, not a broken plot.
    for flag, value, high, unit in (("--peak-compute", ns.peak_compute, 1e6, "TFLOP/s"),
                                    ("--peak-bw", ns.peak_bw, 1e9, "GB/s")):
        if value is not None and not 0 < value <= high:  # also false for nan
            raise UsageError(f"{flag}: must be a positive number, at most {high:g} {unit}, got {value}")
    if not 0 <= ns.tensor_flops_per_inst <= 1e9:
        raise UsageError(f"--tensor-flops-per-inst: must be 0 to 1e+09 FLOPs, got {ns.tensor_flops_per_inst}")
    if ns.model or (ns.source and Path(ns.source).is_dir()):
        return _step_roofline(ns)
    if not ns.source:
        raise UsageError("roofline: give an `ncu --csv` export, a run directory, or --model M to time one here")
    if not Path(ns.source).exists():
        raise UsageError(f"{ns.source}: no such file or run directory")
    if ns.peak_compute is None or ns.peak_bw is None:
        raise UsageError(f"{ns.source}: an Nsight Compute export needs --peak-compute and --peak-bw (the device it "
                         "was captured on; nnperf peak measures this one)")
    ns.csv, ns.out = ns.source, ns.out or "roofline.png"
    inputs = [Path(ns.csv)]
    outputs.file_target("--out", ns.out, inputs, example="roofline.png")
    summary_path = ns.summary or str(Path(ns.out).with_suffix(".csv"))
    outputs.file_target("--summary" if ns.summary else "--summary (by default beside --out)", summary_path, inputs,
                        example="roofline.csv")
    if Path(summary_path).resolve() == Path(ns.out).resolve():
        raise UsageError(f"--summary {summary_path}: is the same file as --out; give the plot and the summary "
                         "different names")
    kernels = roofline.kernels(ns.csv, ns.tensor_flops_per_inst)
    peak_flops, peak_bw = ns.peak_compute * 1e12, ns.peak_bw * 1e9
    table = roofline.summary(kernels, peak_flops, peak_bw)
    outputs.write_with(summary_path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    roofline.plot(kernels, peak_flops, peak_bw, ns.out, ns.label)
    shown = table.assign(kernel=table["kernel"].map(roofline.short_name))
    print(shown[["id", "kernel", "intensity_flop_per_byte", "achieved_tflops", "share_of_ceiling", "bound"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {ns.out} and {summary_path}")
    return 0


def _step_roofline(ns: argparse.Namespace) -> int:
    if ns.model and ns.source:
        raise UsageError(f"--model: give either a run directory ({ns.source}) or --model, not both")
    if not 1 <= ns.batch_size <= 1 << 20:
        raise UsageError(f"--batch-size {ns.batch_size}: must be between 1 and {1 << 20}")
    from .perf import step_roofline

    return step_roofline.run(ns)


def cmd_sweep(ns: argparse.Namespace) -> int:
    if ns.trials is not None and ns.trials < 1:
        raise UsageError(f"--trials: must be 1 or more, got {ns.trials}")
    if ns.out_dir == "":  # would silently mean the default folder
        raise UsageError("--out-dir: must name a folder")
    try:
        from .sweep import sweep
    except ImportError as e:
        raise UsageError(f"nnperf sweep needs Optuna: pip install optuna ({e})") from None
    from optuna.exceptions import StorageInternalError

    try:
        print(sweep(ns.spec, ns.trials, ns.storage, ns.study, ns.out_dir, ns.show))
    except StorageInternalError as e:  # the database could not commit: a full disk, a lost server
        cause = e.__cause__ or e.__context__
        detail = _first_line(cause)[:200] if cause is not None else _first_line(e)[:200]
        raise EnvError(f"the study's database could not be written ({detail}); free space or check --storage, "
                       "then run the same command again") from None
    except Interrupted as e:
        print(f"nnperf sweep: stopped by {signal.Signals(e.signum).name}; the trial's position is saved and "
              "queued; run the same nnperf sweep command again to continue", file=sys.stderr)
        return 128 + e.signum
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from . import data
    from .data import show

    if not 1 <= ns.per_class <= 1000:
        raise UsageError(f"--per-class: must be 1 to 1000, got {ns.per_class}")
    if not 0 <= ns.seed < 2**63:
        raise UsageError(f"--seed: must be 0 to 2**63-1, got {ns.seed}")
    show.check_out(ns.out)
    if ns.data:
        from .names import is_inside, refuse_overwriting_inputs

        refuse_overwriting_inputs({"--out": ns.out}, [ns.data])
        if is_inside(ns.out, ns.data):
            raise UsageError(f"--out {ns.out}: is inside the dataset folder --data {ns.data}; write the grid "
                             "elsewhere")
    cfg = configs.build({}, {"dataset": ns.dataset, "data": ns.data})
    ds = data.load(data.Source.of(cfg))
    print(show.counts(ds))
    print(f"wrote {show.grid(ds, ns.out, ns.per_class, ns.seed)}")
    return 0


def cmd_devices(ns: argparse.Namespace) -> int:
    from .telemetry.devices import describe

    print(describe())
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from . import data, models
    from .train import fit

    given = {f.name: getattr(ns, f.name) for f in configs.fields() if hasattr(ns, f.name)}
    if given.get("model") == "help":
        print("models:\n" + models.describe())
        return 0
    if given.get("dataset") == "help":
        print("datasets: " + ", ".join(data.names()))
        return 0
    cfg, state = _train_config(ns, given)
    if ns.nproc is not None or ns.max_restarts:
        code = _launch(ns, cfg)
        if code is not None:
            return code
    result = fit(cfg, state)
    if not result["main"]:
        return 0
    if cfg.report:
        from .analysis.report import write_report

        print(f"report: {write_report([result['run_dir']], Path(result['run_dir']) / 'report.html', keep_plots=True)}")
    return 0


def _train_config(ns: argparse.Namespace, given: dict):
    """The run's config and checkpoint; after torchrun restarted the processes (--max-restarts), the
    settings that continue the job's own run."""
    from .train import checkpoint, launch

    cfg, state = checkpoint.config_and_state(given, ns.config)
    again = launch.after_restart(given, cfg)
    if again is None:
        return cfg, state
    if os.environ.get("RANK", "0") == "0":
        print(f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}: continuing {again.get('resume') or cfg.name}",
              flush=True)
    return checkpoint.config_and_state(again, ns.config)


def _launch(ns: argparse.Namespace, cfg) -> int | None:
    """--nproc N: the launcher's exit status; None where this process trains itself (--nproc 1)."""
    from .train import launch

    if launch.launched():
        if ns.nproc is None:
            raise UsageError("--max-restarts: this process was started by torchrun, whose own --max-restarts "
                             "restarts the processes; drop nnperf's")
        raise UsageError("--nproc: this process was started by torchrun already; drop --nproc (torchrun's "
                         "--nproc-per-node says how many)")
    if ns.max_restarts < 0 or ns.max_restarts > 1000:
        raise UsageError(f"--max-restarts {ns.max_restarts}: must be 0 to 1000")
    if ns.nproc is None:
        raise UsageError("--max-restarts: only with --nproc N (or torchrun's own --max-restarts)")
    launch.check(ns.nproc, cfg)
    if ns.nproc == 1 and not ns.max_restarts:
        return None
    return launch.start(ns.nproc, ns.argv, cfg, ns.max_restarts)


def cmd_test(ns: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from . import fileio
    from .train import test, test_line

    from .train.rundir import is_run_dir

    if not Path(ns.run_dir).is_dir():
        raise UsageError(f"RUN_DIR {ns.run_dir}: no such run directory")
    if not is_run_dir(ns.run_dir):
        raise UsageError(f"RUN_DIR {ns.run_dir}: not an nnperf run directory (it needs checkpoints/ and nnperf's "
                         "own readable config.yaml); "
                         "test.json is kept only in one")
    from .names import is_inside

    result = test(ns.run_dir, ns.checkpoint, ns.split, ns.device, ns.tta)
    print(test_line(result))
    # Kept beside the run for `nnperf report` and `compare`: the last evaluation of each split.
    path = Path(ns.run_dir) / "test.json"
    if not is_inside(result["checkpoint"], ns.run_dir):
        print(f"(not kept in {path}: the checkpoint is not one of this run's)")
        return 0
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        kept = {}
    if not isinstance(kept, dict):
        kept = {}
    kept[result["split"]] = {**result, "checkpoint": str(result["checkpoint"]), "t": time.time()}
    fileio.write_json(path, kept)
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from .data.formats import shown_name
    from .train import predict

    if ns.topk < 1:
        raise UsageError(f"--topk: must be 1 or more, got {ns.topk}")
    results = predict(ns.checkpoint, ns.images, ns.topk, ns.device)
    if ns.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['prob']:6.1%}  {shown_name(t['class'])}")  # class names are folder names: no escapes
    return 0


def _default_out(paths: list[str]) -> str:
    from pathlib import Path

    one = Path(paths[0])
    if len(paths) == 1 and one.is_dir():
        if (one / "plots").is_symlink():
            raise UsageError(f"{one / 'plots'}: is a link inside the run directory; give --out, or replace the link "
                             "with a folder")
        return str(one / "plots")
    return "plots"


def cmd_plot(ns: argparse.Namespace) -> int:
    from .analysis import plot_runs

    only = [m.strip() for m in ns.metrics.split(",") if m.strip()] if ns.metrics else None
    result = plot_runs(ns.paths, ns.out or _default_out(ns.paths), only)
    if result.skipped:
        print(f"skipped (no file has them): {', '.join(result.skipped)}")
    print(result.table)
    folder = result.written[0].parent if result.written else ns.out
    print(f"\nwrote {len(result.written)} files to {folder}")
    return 0


COMMANDS = {"train": cmd_train, "plot": cmd_plot, "montage": cmd_montage, "compare": cmd_compare, "data": cmd_data,
            "roofline": cmd_roofline, "report": cmd_report, "sweep": cmd_sweep, "test": cmd_test,
            "predict": cmd_predict, "devices": cmd_devices, "bench": cmd_bench, "peak": cmd_peak,
            "profile": cmd_profile}


# The libraries each command needs, imported before it runs while Ctrl-C waits: an interrupt in the
# middle of importing torch or numpy leaves them half-initialised, and the next use fails obscurely.
PRELOAD = {"train": "nnperf.train", "test": "nnperf.train", "predict": "nnperf.train", "data": "nnperf.data",
           "plot": "nnperf.analysis", "report": "nnperf.analysis.report", "compare": "nnperf.analysis.compare",
           "montage": "nnperf.analysis.montage", "roofline": "nnperf.analysis.roofline", "sweep": "nnperf.sweep",
           "devices": "nnperf.telemetry.devices", "bench": "nnperf.perf.bench", "peak": "nnperf.perf.peak",
           "profile": "nnperf.perf.profile"}


def _preload(command: str) -> bool:
    """Import the command's modules with SIGINT/SIGTERM held back; True if one arrived meanwhile."""
    import importlib
    import threading

    arrived = []
    held = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            held[s] = signal.signal(s, lambda signum, frame: arrived.append(signum))
    try:
        importlib.import_module(PRELOAD[command])
    except ImportError:
        pass  # the command says what is missing, in its own words
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
    return bool(arrived)


# Flags that name an output or input file: an empty value would silently mean the default.
_PATH_FLAGS = ("out", "json", "summary", "csv", "ncu")


def _refuse_empty_paths(ns: argparse.Namespace) -> None:
    for name in _PATH_FLAGS:
        if getattr(ns, name, None) == "":
            raise UsageError(f"--{name}: must name a file or folder, not ''")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    ns.argv = list(argv) if argv is not None else sys.argv[1:]  # the command as given (nnperf profile reprints it)
    try:
        _refuse_empty_paths(ns)
        if _preload(ns.command):
            raise KeyboardInterrupt
        return COMMANDS[ns.command](ns)
    except UsageError as e:
        return _fail(ns, e, 2)
    except EnvError as e:
        return _fail(ns, e, 1)
    except Diverged as e:
        return _fail(ns, e, 3)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        if os.environ.get("RANK", "0") == "0":  # one of several processes: rank 0 says it for all
            print(f"nnperf {ns.command}: stopped by {name}; position saved. Resume with:\n"
                  f"  nnperf train --resume {e.checkpoint}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"nnperf {ns.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nnperf compare ... | head`: the reader left, which is no error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # the environment: disk full, read-only folder, permissions, ...
        from .fileio import describe_os_error

        return _fail(ns, describe_os_error(e), 1)
    except MemoryError:
        return _fail(ns, _OUT_OF_MEMORY, 1)
    except Exception as e:  # noqa: BLE001 - a bug still reaches the user as one line, not a traceback
        if os.environ.get("NNPERF_DEBUG"):
            raise
        if _is_out_of_memory(e):
            return _fail(ns, f"{_OUT_OF_MEMORY} ({_first_line(e)[:160]})", 1)
        return _fail(ns, f"unexpected {type(e).__name__}: {_first_line(e)[:300]} (a bug in nnperf; run again with "
                         "NNPERF_DEBUG=1 to see where)", 1)


_OUT_OF_MEMORY = ("out of memory: lower --batch-size, --eval-batch-size, --image-size or --synthetic-size, "
                  "use --loader torch for a dataset larger than the device, or close what else uses the memory")


def _is_out_of_memory(e: Exception) -> bool:
    """PyTorch reports exhausted host or device memory as a RuntimeError (OutOfMemoryError on GPUs)."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                             or "DefaultCPUAllocator" in text)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _fail(ns: argparse.Namespace, error: BaseException | str, code: int) -> int:
    message = error if isinstance(error, str) else _first_line(error)
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else "0"
    if rank != "0":  # one of several processes: rank 0 says what is wrong with the settings or data
        if code == 2 and not message.startswith("rank "):  # a rank's own problem names the rank
            return code
        message = message if message.startswith("rank ") else f"rank {rank} on {socket.gethostname()}: {message}"
    print(f"nnperf {ns.command}: error: {message}", file=sys.stderr)
    return code
