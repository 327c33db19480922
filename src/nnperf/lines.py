"""The one-line summaries nnperf prints (epoch, FINAL, TEST), shared by the training loop,
`nnperf test` and the HTML report. No torch: the analysis commands import it too.

A value a run's files did not give as a number is shown as '-'.
"""

from __future__ import annotations

import numbers


def fixed(value, digits: int = 3) -> str:
    """`value` with `digits` decimals, or '-' when it is not a number."""
    return f"{value:.{digits}f}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "-"


def epoch_line(train: dict, val: dict | None) -> str:
    ips = f"{train['images_per_s']:.0f}" if train.get("images_per_s") else "-"
    evaluated = f"val {fixed(val.get('loss'))} top1 {fixed(val.get('top1'))} top5 {fixed(val.get('top5'))}" \
        if val else "val -"
    mfu = f" | MFU {100 * train['mfu']:.1f}%" if isinstance(train.get("mfu"), numbers.Real) else ""
    return (f"e{train['epoch']}: train {fixed(train.get('loss'))}/{fixed(train.get('top1'))} | {evaluated} | "
            f"{fixed(train.get('seconds'), 1)}s {ips} img/s{mfu}")


def final_line(best: dict | None) -> str:
    """The best evaluated epoch (what best.pt holds)."""
    if not best:
        return "FINAL: no evaluation yet (the run stopped before its first evaluation)"
    epoch = best.get("epoch")
    epoch = f" (epoch {int(epoch)})" if isinstance(epoch, numbers.Real) and epoch == epoch else ""
    return f"FINAL top1 {fixed(best.get('top1'))}, top5 {fixed(best.get('top5'))}, loss {fixed(best.get('loss'))}{epoch}"


def partial_line(val: dict) -> str:
    """The evaluation of an epoch that --max-steps cut short."""
    return (f"FINAL top1 {fixed(val['top1'])}, top5 {fixed(val['top5'])}, loss {fixed(val['loss'])} (step "
            f"{val['step']}, epoch {val['epoch']} cut short by --max-steps; not a best.pt: --resume finishes it)")


def test_line(result: dict, split: str | None = None) -> str:
    """`nnperf test`'s result; with `split`, the form the report shows beside other splits."""
    if split is not None:
        return (f"TEST ({split}) top1={fixed(result.get('top1'))} top5={fixed(result.get('top5'))} "
                f"loss={fixed(result.get('loss'))}")
    return f"TEST top1={fixed(result['top1'])}  top5={fixed(result['top5'])}  loss={fixed(result['loss'])}"
