"""The `nnperf` command: parses flags, calls one function per subcommand, turns errors into one line."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from . import config as configs
from .errors import Interrupted, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML preset; flags given here override it")
    for f in configs.fields():
        meta = f.metadata
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"]}
        if meta["kind"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["kind"]
            kwargs["metavar"] = f.name.upper() if not meta["choices"] else "{" + ",".join(meta["choices"]) + "}"
        p.add_argument(configs.flag_name(f.name), **kwargs)


def _parser() -> Parser:
    root = Parser(prog="nnperf", description="Train image classifiers and see what the hardware did.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = sub.add_parser("train", help="train a model; writes a run directory")
    _add_config_flags(train)
    test = sub.add_parser("test", help="re-evaluate a run's best checkpoint")
    test.add_argument("run_dir", metavar="RUN_DIR")
    test.add_argument("--checkpoint", metavar="PATH", help="evaluate this checkpoint instead of best.pt")
    test.add_argument("--split", help="train, val or test (default: the split training evaluated on)")
    test.add_argument("--device", help="device to evaluate on (default: the run's)")
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
    return root


def cmd_devices(ns: argparse.Namespace) -> int:
    from .telemetry.devices import describe

    print(describe())
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from . import data, models
    from .train import checkpoint, fit

    given = {f.name: getattr(ns, f.name) for f in configs.fields() if hasattr(ns, f.name)}
    if given.get("model") == "help":
        print("models:\n" + models.describe())
        return 0
    if given.get("dataset") == "help":
        print("datasets: " + ", ".join(data.names()))
        return 0
    preset = configs.load_yaml(ns.config) if ns.config else {}
    resume = given.get("resume") or preset.get("resume")
    if resume:
        state = checkpoint.load(resume)
        cfg = checkpoint.resume_config(state, preset, given, resume)
    else:
        state, cfg = None, configs.build(preset, given)
    fit(cfg, state)
    return 0


def cmd_test(ns: argparse.Namespace) -> int:
    from .train import test, test_line

    print(test_line(test(ns.run_dir, ns.checkpoint, ns.split, ns.device)))
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
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
            print(f"  {t['prob']:6.1%}  {t['class']}")
    return 0


def _default_out(paths: list[str]) -> str:
    from pathlib import Path

    one = Path(paths[0])
    return str(one / "plots") if len(paths) == 1 and one.is_dir() else "plots"


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


COMMANDS = {"train": cmd_train, "plot": cmd_plot, "test": cmd_test, "predict": cmd_predict, "devices": cmd_devices}


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except UsageError as e:
        print(f"nnperf {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(f"nnperf {ns.command}: stopped by {name}; position saved. Resume with:\n"
              f"  nnperf train --resume {e.checkpoint}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"nnperf {ns.command}: interrupted", file=sys.stderr)
        return 130
