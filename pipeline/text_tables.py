"""The domain-shift study's tables as plain text, for `report.txt` (`pipeline.report.write_outputs`); the same
figures as markdown are `pipeline/markdown.py`'s. Each takes `report.summarise`'s table and one stream."""

from __future__ import annotations

from typing import Any

from pipeline.comparisons import OVERALL
from pipeline.markdown import share_text


def format_table(table: list[dict[str, Any]], stream: str) -> str:
    """A speedup matrix for one stream: methods as rows, domains (then overall) as columns."""
    rows = [r for r in table if r["stream"] == stream]
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != OVERALL)) + [OVERALL]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["domain"]): r for r in rows}
    width = max(10, max(len(d) for d in domains) + 1)
    lines = [f"{'method':<20}" + "".join(f"{d[:width - 1]:>{width}}" for d in domains)
             + f"{'overall 95% CI':>16}{'mean acc':>10}{'identical':>10}"]
    for method in methods:
        overall = cell[(method, OVERALL)]
        lines.append(f"{method:<20}" + "".join(f"{cell[(method, d)]['speedup']:>{width}.3f}" for d in domains)
                     + f"{interval_text(overall):>16}"
                     + (f"{overall['mean_accepted']:>10.2f}" if overall["mean_accepted"] else f"{'-':>10}")
                     + f"{overall['identical']:>10.2f}")
    knn = cell.get(("knn", OVERALL))
    if knn is not None:
        lines.append(f"routing accuracy (knn): {knn['routing_accuracy']:.3f}")
    return "\n".join(lines)


def format_acceptance(table: list[dict[str, Any]], stream: str) -> str:
    """Per method (ours: the loop's counts) and domain (then overall): mean accepted tokens per verify step /
    mean verify width, e.g. "1.43/8.09"; the last columns are the shares of verify steps that verified a tree and
    that verified no draft ("-": not recorded)."""
    rows = [r for r in table if r["stream"] == stream and r["mean_verify_width"] > 0]
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != OVERALL)) + [OVERALL]
    cell = {(r["method"], r["domain"]): r for r in rows}
    width = max(12, max(len(d) for d in domains) + 1)
    lines = [f"{'method':<20}" + "".join(f"{d[:width - 1]:>{width}}" for d in domains) + f"{'tree steps':>12}"
             + f"{'no draft':>10}"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [cell.get((method, d)) for d in domains]
        texts = ["%.2f/%.2f" % (c["mean_accepted"], c["mean_verify_width"]) if c else "-" for c in cells]
        lines.append(f"{method:<20}" + "".join(f"{t:>{width}}" for t in texts)
                     + f"{cell[(method, OVERALL)]['tree_share']:>12.0%}" + f"{share_text(cell[(method, OVERALL)]):>10}")
    return "\n".join(lines)


def format_decode(table: list[dict[str, Any]], stream: str) -> str | None:
    """The decoding phase's speedup (prefill excluded) per method of ours and domain (then overall, with its
    interval), and plain decoding's prefill share per domain; None where no row has it."""
    rows = [r for r in table if r["stream"] == stream and r["decode_speedup"] == r["decode_speedup"]]
    if not rows:
        return None
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != OVERALL)) + [OVERALL]
    cell = {(r["method"], r["domain"]): r for r in rows}
    width = max(10, max(len(d) for d in domains) + 1)
    lines = [f"{'method':<20}" + "".join(f"{d[:width - 1]:>{width}}" for d in domains) + f"{'overall 95% CI':>16}"]
    for method in dict.fromkeys(r["method"] for r in rows):
        overall = cell[(method, OVERALL)]
        lines.append(f"{method:<20}" + "".join(f"{cell[(method, d)]['decode_speedup']:>{width}.3f}"
                                               if (method, d) in cell else f"{'-':>{width}}" for d in domains)
                     + f"{'[%.3f,%.3f]' % (overall['decode_speedup_low'], overall['decode_speedup_high']):>16}")
    plain = [cell.get(("plain", d)) for d in domains]
    lines.append(f"{'plain: prefill share':<20}"
                 + "".join(f"{c['prefill_share']:>{width}.0%}" if c else f"{'-':>{width}}" for c in plain))
    return "\n".join(lines)


def interval_text(row: dict[str, Any]) -> str:
    return f"[{row['speedup_low']:.3f},{row['speedup_high']:.3f}]"
