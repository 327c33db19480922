"""One self-contained HTML report for one or more runs: no network, images inline, text escaped."""

from __future__ import annotations

import base64
import html
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from .. import lines
from . import compare, logs, outputs, plot_runs, ranks, runinfo, summary

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1180px;
       color: #1d2329; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; margin-top: 2.5rem; }
h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1rem 0; }
.headline div { background: #f3f5f7; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
.headline b { display: block; font-size: 1.3rem; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: .8rem; }
.plots img { width: 100%; border: 1px solid #e5e8eb; }
details summary { cursor: pointer; font-weight: 600; margin: .8rem 0 .3rem; }
.note { color: #57606a; font-size: .85rem; }
"""


def _esc(value) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    return summary.format_number(value, digits)  # plain text: the caller escapes it once


def _table(frame: pd.DataFrame, index_label: str = "") -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in [index_label, *frame.columns])
    body = []
    for idx, row in frame.iterrows():
        cells = "".join(f'<td class="num">{_esc(_num(v))}</td>'
                        if isinstance(v, (int, float)) and not isinstance(v, bool) else f"<td>{_esc(v)}</td>"
                        for v in row)
        body.append(f"<tr><th>{_esc(idx)}</th>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv_table(pairs: dict) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)}"
                   "</td></tr>"
                   for k, v in pairs.items())
    return f"<table><tbody>{rows}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _headline(items: list[tuple[str, str]]) -> str:
    return '<div class="headline">' + "".join(f"<div>{_esc(k)}<b>{_esc(v)}</b></div>" for k, v in items) + "</div>"


def _energy_table(mets: pd.DataFrame) -> str:
    if "energy_j" not in mets.columns or not mets["energy_j"].notna().any():
        return '<p class="note">Energy: this hardware reported no power or energy, so none is shown.</p>'
    per = mets.pivot_table(index="epoch", columns="phase", values="energy_j", aggfunc="sum")
    per["total"] = per.sum(axis=1)
    per.columns = [f"{c} (J)" for c in per.columns]
    return "<h3>Energy per epoch</h3>" + _table(per, "epoch")


def _straggler_section(result) -> str:
    """Per epoch of a multi-process run: the slowest rank, its step time and the fastest's, and each
    rank's mean utilisation; nothing for a single process."""
    strag = result.stragglers
    if strag.empty:
        return ""
    per_epoch = ranks.epochs(strag).drop(columns="run").set_index("epoch")
    used = ", ".join(sorted(strag["util_metric"].dropna().unique())) or "none reported"
    note = (f'<p class="note">{strag["rank"].nunique()} ranks. Step time: each rank\'s mean training step; '
            f"ratio: the slowest rank's over the fastest's. Utilisation: mean {_esc(used)} over the epoch's "
            "training.</p>")
    plot = _img(result.straggler_plot, "stragglers") if result.straggler_plot else ""
    return "<h3>Ranks: stragglers per epoch</h3>" + note + _table(per_epoch, "epoch") + plot


def _run_section(src: logs.Source, plots_dir: Path) -> str:
    files = [str(p) for p in src.telemetry] + ([str(src.metrics)] if src.metrics else [])
    result = plot_runs([str(src.run_dir)] if src.run_dir else files, plots_dir)
    mets = logs.metrics([src])
    cfg, env = runinfo.config(src), runinfo.env(src)
    best, tests = runinfo.final(mets), runinfo.test_results(src)
    summary = result.summary.iloc[0].to_dict() if len(result.summary) else {}
    items = [("FINAL top-1", _num(best.get("top1"), 4)), ("FINAL top-5", _num(best.get("top5"), 4)),
             ("best epoch", _num(best.get("epoch")))]
    mfu = runinfo.mean_mfu(mets)
    if mfu is not None:
        items.append(("MFU", f"{100 * mfu:.1f}%"))
    items += [(f"TEST top-1 ({split})", _num(r.get("top1"), 4)) for split, r in tests.items()]
    items += [("time", f"{_num(summary.get('duration_s'))} s"), ("images/s", _num(summary.get("images_per_s"))),
              ("energy", f"{_num(summary.get('energy_j'))} J" if pd.notna(summary.get("energy_j")) else "not reported"),
              ("energy/epoch", f"{_num(summary.get('energy_per_epoch_j'))} J"
               if pd.notna(summary.get("energy_per_epoch_j")) else "-")]
    curves, telemetry = result.curves, result.telemetry
    env_shown = {k: v for k, v in env.items() if k not in ("data", "telemetry")}
    parts = [f'<section class="run"><h2>Run: {_esc(src.label)}</h2>', _headline(items)]
    if best:
        parts.append(f"<p>{_esc(lines.final_line(best))}</p>")
    parts += [f"<p>{_esc(lines.test_line(r, split))}</p>" for split, r in tests.items()]
    parts.append("<h3>Training curves</h3>" + ('<div class="plots">' + "".join(_img(p, p.stem) for p in curves)
                                                + "</div>" if curves else '<p class="note">No metrics.jsonl.</p>'))
    parts.append(_energy_table(mets))
    parts.append("<h3>Telemetry</h3>" + ('<div class="plots">' + "".join(_img(p, p.stem) for p in telemetry) + "</div>"
                                         if telemetry else '<p class="note">No telemetry rows.</p>'))
    if result.skipped:
        parts.append(f'<p class="note">Not reported by this hardware: {_esc(", ".join(result.skipped))}.</p>')
    parts.append(_straggler_section(result))
    parts.append("<h3>Summary</h3><pre>" + _esc(result.table) + "</pre>")
    parts.append("<details><summary>Configuration</summary>" + _kv_table(cfg) + "</details>")
    parts.append("<details><summary>Environment</summary>" + _kv_table(env_shown) + "</details>")
    return "\n".join(parts) + "</section>"


def write_report(paths: list[str], out: str | Path, keep_plots: bool = False) -> Path:
    """Build the report for the runs at `paths` and write it atomically to `out`; with `keep_plots`
    each run's PNGs and CSVs also stay in its RUN_DIR/plots."""
    srcs = logs.sources(paths)
    out = outputs.file_target("--out", out, outputs.read_paths(srcs, paths), example="report.html")
    title = "nnperf report: " + ", ".join(s.label for s in srcs)
    body = [f"<h1>{_esc(title)}</h1>",
            f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M:%S")} from {len(srcs)} run(s).</p>']
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if len(srcs) > 1:
            frame, differ = compare.side_by_side(srcs)
            body.append('<section id="compare"><h2>Side by side</h2>' + _table(frame, "field"))
            body.append(f"<p>Config keys that differ: {_esc(', '.join(differ) or 'none')}</p>")
            overlay = plot_runs(paths, work / "_overlay", only=[])
            body.append('<div class="plots">' + "".join(_img(p, p.stem) for p in overlay.written
                                                        if p.name in ("curve_top1.png", "curve_loss.png")) + "</div>")
            body.append("</section>")
        for i, src in enumerate(srcs):
            keep = keep_plots and src.run_dir is not None
            body.append(_run_section(src, src.run_dir / "plots" if keep else work / f"run{i}"))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    outputs.write_with(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
