"""--tensorboard and --wandb: read back what they wrote; a failing sink never stops training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nnperf import track

from conftest import TINY

def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_scalar_and_the_config(run_cli, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--name", "r", "--tensorboard",
                             "--telemetry-interval", "0.05")
    assert code == 0, err
    run = tmp_path / "runs" / "r"
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/top1", "train/top5", "train/lr", "train/grad_norm", "train/batch_size",
                "val/loss", "val/top1", "val/top5", "batch/train_loss", "batch/val_loss",
                "telemetry/cpu/cpu_util_pct", "telemetry/cpu/proc_rss_mb"):
        assert tag in scalars, tag
    rows = _metrics(run)
    train = [r for r in rows if r["phase"] == "train"]
    val = [r for r in rows if r["phase"] == "val"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["top1"] for r in val], rel=1e-6)
    assert [e.step for e in events.Scalars("val/top1")] == [1, 2]
    assert [e.value for e in events.Scalars("train/batch_size")] == [32, 32]
    batch_losses = events.Scalars("batch/train_loss")
    assert len(batch_losses) == train[-1]["step"]  # one per training step
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert {"config/text_summary", "optimizer/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "model: small_cifar" in config_text and "tensorboard: true" in config_text


def test_wandb_offline_writes_its_files_and_says_where(run_cli, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--name", "w", "--wandb", "--wandb-project", "t")
    assert code == 0, err
    run = tmp_path / "runs" / "w"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert "W&B offline: " in out and "wandb sync" in out
    records = _wandb_records(next(offline[0].glob("run-*.wandb")))  # the event log `wandb sync` uploads
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for u in r.run.config.update}
    assert config["model"] == "small_cifar" and config["wandb_project"] == "t"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [h for h in history if "val/top1" in h]
    val = [r for r in _metrics(run) if r["phase"] == "val"]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert [h["val/top1"] for h in epochs] == pytest.approx([r["top1"] for r in val])
    assert any("batch/train_loss" in h for h in history) and any("batch/val_loss" in h for h in history)
    assert any("telemetry/cpu/cpu_util_pct" in h for h in history)


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-style log
    blocks of 32 KiB holding (crc32, length, type) framed chunks of protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def test_missing_wandb_package_is_one_line(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "x", "--wandb")
    assert code == 2
    assert err.strip() == ("nnperf train: error: --wandb: the 'wandb' package is not installed; "
                           "pip install 'nnperf[wandb]' (or pip install wandb)")


class _Broken:
    name = "Broken"
    wants = frozenset({"telemetry"})

    def log(self, row):
        if row["kind"] == "step":
            raise ConnectionError("service unreachable")
        raise AssertionError("not called after the first failure")

    def close(self):
        raise AssertionError("not called after the first failure")


class _Recorder:
    name = "Recorder"
    wants = frozenset({"telemetry"})

    def __init__(self):
        self.epochs, self.rows, self.closed = [], [], False

    def log(self, row):
        if row["kind"] == "epoch":
            self.epochs.append(row["epoch"])
        elif row["kind"] == "telemetry":
            self.rows += row["rows"]

    def close(self):
        self.closed = True


def test_a_failing_sink_is_switched_off_with_one_warning_and_the_others_go_on(tmp_path):
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "train_epoch.jsonl").write_text('{"t": 1, "cpu_util_pct": 50}\n{"t": 2, "cpu_')
    warnings, recorder = [], _Recorder()
    sinks = track.Sinks([track.BestEffort(_Broken(), warnings.append), recorder], tmp_path, warnings.append)
    sinks.log({"kind": "step", "step": 1})
    sinks.log({"kind": "epoch", "epoch": 1, "step": 10, "train": {}, "val": None})
    with open(tmp_path / "telemetry" / "train_epoch.jsonl", "a") as f:
        f.write('util_pct": 60}\n')
    sinks.close()
    assert len(warnings) == 1 and "Broken: logging failed (ConnectionError: service unreachable)" in warnings[0]
    assert recorder.epochs == [1] and recorder.closed
    assert [r["t"] for r in recorder.rows] == [1, 2]  # the torn line is read once it is whole
