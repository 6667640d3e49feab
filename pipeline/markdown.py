"""The domain-shift study's tables as markdown (`tables.md` beside `report.txt`), ready to paste into a report.

Per stream: speedup over plain decoding with its 95% paired-bootstrap interval, per method and domain (overall
last); mean accepted tokens per verify step / mean verify width, per method and domain, with the share of verify
steps that verified a token tree; the decoding phase's speedup (prefill taken out) where recorded; and KNN-SSD's
verdict against each baseline per domain (`pipeline.comparisons`). The figures are those of `report.summarise`;
no torch needed, so `--rerender` writes it too.
"""

from __future__ import annotations

from typing import Any

from pipeline.comparisons import OVERALL

SHORT = {"loses to": "loses", "no significant difference from": "no significant difference",
         "too few prompts to compare with": "too few prompts"}  # pipeline.bootstrap.verdict's words, in a cell


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> list[str]:
    return [_row(cells), _row(["---"] * len(cells))]


def speedup_table(table: list[dict[str, Any]], stream: str) -> list[str]:
    """| method | each domain | overall |, cells "1.23 [1.09, 1.40]"; KNN-SSD's row in bold."""
    rows = [r for r in table if r["stream"] == stream and r["method"] != "plain"]
    domains = [d for d in dict.fromkeys(r["domain"] for r in rows) if d != OVERALL] + [OVERALL]
    cell = {(r["method"], r["domain"]): r for r in rows}
    lines = _header(["method", *domains])
    for method in dict.fromkeys(r["method"] for r in rows):
        texts = [f"{c['speedup']:.2f} [{c['speedup_low']:.2f}, {c['speedup_high']:.2f}]" if c else "-"
                 for c in (cell.get((method, d)) for d in domains)]
        lines.append(_row([f"**{method}**", *(f"**{t}**" for t in texts)] if method == "knn" else [method, *texts]))
    return lines


def share_text(row: dict[str, Any]) -> str:
    """The row's share of steps with no draft, e.g. "23%", or "-" where it was not recorded."""
    share = row.get("no_draft_share", float("nan"))
    return "-" if share != share else f"{share:.0%}"


def acceptance_table(table: list[dict[str, Any]], stream: str) -> list[str]:
    """| method | each domain | overall | tree steps | no draft |, cells "mean accepted / mean verify width"; our
    methods (no draft: the share of verify steps that verified no draft, "-" where not recorded)."""
    rows = [r for r in table if r["stream"] == stream and r["mean_verify_width"] > 0]
    domains = [d for d in dict.fromkeys(r["domain"] for r in rows) if d != OVERALL] + [OVERALL]
    cell = {(r["method"], r["domain"]): r for r in rows}
    lines = _header(["method", *domains, "tree steps", "no draft"])
    for method in dict.fromkeys(r["method"] for r in rows):
        texts = [f"{c['mean_accepted']:.2f} / {c['mean_verify_width']:.2f}" if c else "-"
                 for c in (cell.get((method, d)) for d in domains)]
        overall = cell[(method, OVERALL)]
        lines.append(_row([method, *texts, f"{overall['tree_share']:.0%}", share_text(overall)]))
    return lines


def decode_table(table: list[dict[str, Any]], stream: str) -> list[str]:
    """| method | each domain | overall |, cells "decoding-phase speedup [95% CI]" (each run's prefill taken out),
    for our methods, then plain decoding's prefill share; [] where the rows have no prefill seconds."""
    rows = [r for r in table if r["stream"] == stream and r["decode_speedup"] == r["decode_speedup"]]
    if not rows:
        return []
    domains = [d for d in dict.fromkeys(r["domain"] for r in rows) if d != OVERALL] + [OVERALL]
    cell = {(r["method"], r["domain"]): r for r in rows}
    lines = _header(["method", *domains])
    for method in (m for m in dict.fromkeys(r["method"] for r in rows) if m != "plain"):
        texts = [f"{c['decode_speedup']:.2f} [{c['decode_speedup_low']:.2f}, {c['decode_speedup_high']:.2f}]"
                 if c else "-" for c in (cell.get((method, d)) for d in domains)]
        lines.append(_row([f"**{method}**", *(f"**{t}**" for t in texts)] if method == "knn" else [method, *texts]))
    lines.append(_row(["plain: prefill share of its time", *(f"{c['prefill_share']:.0%}" if c else "-"
                                                             for c in (cell.get(("plain", d)) for d in domains))]))
    return lines


def verdict_table(judged: list[tuple[str, int, Any, list[Any]]]) -> list[str]:
    """| domain (prompts) | KNN-SSD | vs each baseline |, cells "verdict, difference [95% CI] (note)", from
    `comparisons.judgements` of one stream."""
    if not judged:
        return []
    lines = _header(["domain (prompts)", "KNN-SSD", *(f"vs {c.label}" for c in judged[0][3])])
    for domain, count, knn, found in judged:
        cells = [f"{SHORT.get(c.verdict, c.verdict)}, {c.difference.estimate:+.3f} [{c.difference.low:+.3f}, "
                 f"{c.difference.high:+.3f}]" + (f" ({c.note})" if c.note else "") for c in found]
        lines.append(_row([f"{domain} ({count})", f"{knn.estimate:.2f} [{knn.low:.2f}, {knn.high:.2f}]", *cells]))
    return lines


def markdown_tables(table: list[dict[str, Any]], judged: dict[str, list[tuple[str, int, Any, list[Any]]]]) -> str:
    """Every stream's three tables, titled: from `report.summarise`'s table and `comparisons.judgements` per stream."""
    parts = []
    for stream in dict.fromkeys(r["stream"] for r in table):
        parts += [f"Speedup over plain decoding, {stream} stream (95% paired-bootstrap interval over prompts):", "",
                  *speedup_table(table, stream), "",
                  f"Mean accepted tokens per verify step / mean verify width, {stream} stream:", "",
                  *acceptance_table(table, stream), ""]
        decode = decode_table(table, stream)
        if decode:
            parts += [f"The decoding phase alone, {stream} stream: speedup with each run's prefill taken out (the "
                      "same computation for every method of ours; 95% interval):", "", *decode, ""]
        verdicts = verdict_table(judged.get(stream, []))
        if verdicts:
            parts += [f"KNN-SSD against each baseline, {stream} stream: verdict, speedup difference [95% CI] "
                      "(a verdict only where the interval excludes 0, on 10 prompts or more):", "", *verdicts, ""]
    return "\n".join(parts)
