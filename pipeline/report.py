"""The figures of the domain-shift study, from its per-prompt rows: summary tables, verdicts, plot, files.

Needs no torch: `jobs/evaluate.py --rerender` rebuilds a run's report from its per_prompt.csv alone.

    speedup       = sum of plain seconds / sum of the method's seconds, over the same prompts
    mean_accepted, acceptance: pooled by knnssd.stats.Tally (our methods; 0 for transformers' peers)
    identical     = fraction of prompts whose tokens equal plain decoding's
    routing_accuracy (knn) = fraction routed to the prompt's true domain (a fallback counts as a miss)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from knnssd.reports import bar_chart, write_csv
from knnssd.stats import Tally

OVERALL = "overall"


@dataclass(frozen=True)
class PromptRun:
    """One row of the per-prompt table."""

    stream: str
    order: int
    domain: str
    method: str
    seconds: float
    plain_seconds: float
    new_tokens: int
    accepted: int
    drafted: int
    steps: int
    identical: bool
    routed_to: str


def summarise(rows: list[PromptRun]) -> list[dict[str, Any]]:
    """Per (stream, method, domain) and per (stream, method, overall): the figures of the module docstring."""
    groups: dict[tuple[str, str, str], list[PromptRun]] = {}
    for row in rows:
        for domain in (row.domain, OVERALL):
            groups.setdefault((row.stream, row.method, domain), []).append(row)
    table = []
    for (stream, method, domain), group in groups.items():
        tally = sum((Tally(accepted=r.accepted, drafted=r.drafted, steps=r.steps) for r in group), Tally())
        entry: dict[str, Any] = {
            "stream": stream, "method": method, "domain": domain, "prompts": len(group),
            "speedup": sum(r.plain_seconds for r in group) / sum(r.seconds for r in group),
            "mean_accepted": tally.mean_accepted_tokens,
            "acceptance": tally.acceptance_rate,
            "identical": sum(r.identical for r in group) / len(group),
            "routing_accuracy": (sum(r.routed_to == r.domain for r in group) / len(group)
                                 if method == "knn" else float("nan")),
        }
        table.append(entry)
    return table


def _compare(knn: float, other: float, tie: float) -> str:
    if abs(knn - other) <= tie * other:
        return f"ties with (within {tie:.0%})"
    return "beats" if knn > other else "does not beat"


def verdicts(table: list[dict[str, Any]], tie: float = 0.02) -> list[str]:
    """Plain statements: per stream and domain (overall last), does knn beat Self-SD(Fix) (each fixed policy,
    and their mean) and Self-SD(Mix)? Differences within `tie` (relative) are called ties: repeated runs of one
    method on this CPU differ by a few percent. Figures included, whatever the answer."""
    lines = []
    index = {(r["stream"], r["method"], r["domain"]): r["speedup"] for r in table}
    streams = list(dict.fromkeys(r["stream"] for r in table))
    for stream in streams:
        domains = [d for d in dict.fromkeys(r["domain"] for r in table if r["stream"] == stream) if d != OVERALL]
        fixes = sorted({r["method"] for r in table if r["method"].startswith("fix-")})
        for domain in domains + [OVERALL]:
            knn = index.get((stream, "knn", domain))
            if knn is None:
                continue
            parts = []
            if fixes:
                values = [index[(stream, f, domain)] for f in fixes]
                mean = sum(values) / len(values)
                beaten = sum(knn > v for v in values)
                parts.append(f"{_compare(knn, mean, tie)} Self-SD(Fix) on average "
                             f"({knn:.3f} vs mean {mean:.3f}; above {beaten} of {len(values)} fixed policies, "
                             f"best fixed {max(values):.3f})")
            if (stream, "mix", domain) in index:
                mix = index[(stream, "mix", domain)]
                parts.append(f"{_compare(knn, mix, tie)} Self-SD(Mix) ({knn:.3f} vs {mix:.3f})")
            lines.append(f"{stream} stream, {domain}: KNN-SSD " + "; ".join(parts) if parts else
                         f"{stream} stream, {domain}: KNN-SSD {knn:.3f} (no Fix or Mix to compare)")
    return lines


def read_rows(path: Any) -> list[PromptRun]:
    """The rows of a per_prompt.csv written by `write_outputs`."""
    rows = []
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            rows.append(PromptRun(
                stream=r["stream"], order=int(r["order"]), domain=r["domain"], method=r["method"],
                seconds=float(r["seconds"]), plain_seconds=float(r["plain_seconds"]), new_tokens=int(r["new_tokens"]),
                accepted=int(r["accepted"]), drafted=int(r["drafted"]), steps=int(r["steps"]),
                identical=r["identical"] == "True", routed_to=r["routed_to"]))
    return rows


def format_table(table: list[dict[str, Any]], stream: str) -> str:
    """A speedup matrix for one stream: methods as rows, domains (then overall) as columns."""
    rows = [r for r in table if r["stream"] == stream]
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != OVERALL)) + [OVERALL]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["domain"]): r for r in rows}
    width = max(10, max(len(d) for d in domains) + 1)
    lines = [f"{'method':<20}" + "".join(f"{d[:width - 1]:>{width}}" for d in domains)
             + f"{'mean acc':>10}{'identical':>10}"]
    for method in methods:
        overall = cell[(method, OVERALL)]
        lines.append(f"{method:<20}" + "".join(f"{cell[(method, d)]['speedup']:>{width}.3f}" for d in domains)
                     + (f"{overall['mean_accepted']:>10.2f}" if overall["mean_accepted"] else f"{'-':>10}")
                     + f"{overall['identical']:>10.2f}")
    knn = cell.get(("knn", OVERALL))
    if knn is not None:
        lines.append(f"routing accuracy (knn): {knn['routing_accuracy']:.3f}")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], path: Any, title: str) -> None:
    """Figure-1-style grouped bars: speedup per domain (overall last) for each method, one panel per stream."""
    panels = []
    for stream in dict.fromkeys(r["stream"] for r in table):
        rows = [r for r in table if r["stream"] == stream and r["method"] != "plain"]
        domains = [d for d in dict.fromkeys(r["domain"] for r in rows) if d != OVERALL] + [OVERALL]
        cell = {(r["method"], r["domain"]): r["speedup"] for r in rows}
        series = {m: [cell[(m, d)] for d in domains] for m in dict.fromkeys(r["method"] for r in rows)}
        panels.append((f"{title}: {stream} stream", domains, series))
    bar_chart(Path(path), panels, ylabel="speedup over plain", highlight="knn")


def metric_key(row: dict[str, Any], figure: str) -> str:
    """MLflow metric name, e.g. speedup/task/knn/coding."""
    return f"{figure}/{row['stream']}/{row['method']}/{row['domain']}"


def write_outputs(rows: list[PromptRun], table: list[dict[str, Any]], folder: Any, title: str,
                  tie: float = 0.02) -> list[str]:
    """per_prompt.csv, summary.csv, summary.json, speedup.png and report.txt in `folder`; returns the report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv([asdict(r) for r in rows], folder / "per_prompt.csv")
    write_csv(table, folder / "summary.csv")
    (folder / "summary.json").write_text(json.dumps(table, indent=2))
    plot(table, folder / "speedup.png", title)
    report = []
    for stream in dict.fromkeys(r["stream"] for r in table):
        report += [f"speedup over plain decoding, {stream} stream:", format_table(table, stream), ""]
    report += verdicts(table, tie)
    mismatched = sorted({(r.method, r.domain) for r in rows if not r.identical and not r.method.startswith("hf-")})
    report.append("lossless: every method of ours token-identical to plain decoding on every prompt" if not mismatched
                  else f"NOT LOSSLESS: {mismatched}")
    peers = sorted({(r.method, r.domain) for r in rows if not r.identical and r.method.startswith("hf-")})
    if peers:
        report.append(f"transformers' peers differ from plain greedy decoding on: {peers}")
    (folder / "report.txt").write_text("\n".join(report) + "\n")
    return report
