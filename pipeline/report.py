"""The figures of the domain-shift study, from its per-prompt rows: summary tables, verdicts, plot, files.

Needs no torch: `jobs/evaluate.py --rerender` rebuilds a run's report from its per_prompt.csv alone.

    speedup       = sum of plain seconds / sum of the method's seconds, over the same prompts, with a 95%
                    paired-bootstrap interval over prompts (speedup_low, speedup_high; `pipeline.bootstrap`)
    decode_speedup = the same over seconds less each run's prefill (our methods; the prefill is the same
                    computation for each of them): the decoding phase alone, with its interval (decode_speedup_low,
                    decode_speedup_high); NaN for transformers' peers and rows written before 2026-12-05's prefill
                    columns
    prefill_share = plain decoding's prefill seconds / its seconds over the group's prompts (NaN where unknown)
    mean_accepted, acceptance, mean_verify_width: pooled by knnssd.engine.stats.Tally (our methods; 0 for
                    transformers' peers); mean_verify_width = (drafted + steps) / steps, the tokens a verify pass
                    actually ran on (a tree's nodes plus the last committed token; 1.0 for plain decoding)
    tree_share    = verify steps that verified a token tree / verify steps
    no_draft_share = verify steps that verified no draft at all / verify steps (NaN for rows of a per_prompt.csv
                    written before the count was kept: unknown, not zero)
    identical     = fraction of prompts whose tokens equal plain decoding's
    routing_accuracy (knn) = fraction routed to the prompt's true domain (a fallback counts as a miss)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from knnssd.bundle.reports import bar_chart, write_csv
from knnssd.engine.stats import Tally
from pipeline.bootstrap import speedup_interval
from pipeline.comparisons import OVERALL, judgements
from pipeline.text_tables import format_acceptance, format_decode, format_table

# Spec-Bench's leaderboard columns: its 8 MT-bench categories pooled (or merged into "chat"), then the five tasks.
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
LEADERBOARD = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


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
    tree_steps: int = 0  # absent from per_prompt.csv files written before token trees: read as 0
    no_draft_steps: int | None = None  # absent from per_prompt.csv files written before 2026-12-05: unknown
    prefill_seconds: float | None = None  # the method's prefill (ours; None for transformers' peers, old files)
    plain_prefill_seconds: float | None = None  # plain decoding's prefill on the same prompt


def decode_seconds(group: list[PromptRun]) -> tuple[list[float], list[float]] | None:
    """(plain, method) seconds of each row less its prefill: the decoding phase; None where a row lacks either
    prefill."""
    if any(r.prefill_seconds is None or r.plain_prefill_seconds is None for r in group):
        return None
    return ([r.plain_seconds - r.plain_prefill_seconds for r in group],
            [r.seconds - r.prefill_seconds for r in group])


def summarise(rows: list[PromptRun]) -> list[dict[str, Any]]:
    """Per (stream, method, domain) and per (stream, method, overall): the figures of the module docstring."""
    groups: dict[tuple[str, str, str], list[PromptRun]] = {}
    for row in rows:
        for domain in (row.domain, OVERALL):
            groups.setdefault((row.stream, row.method, domain), []).append(row)
    table = []
    for (stream, method, domain), group in groups.items():
        tally = sum((Tally(accepted=r.accepted, drafted=r.drafted, steps=r.steps) for r in group), Tally())
        interval = speedup_interval([r.plain_seconds for r in group], [r.seconds for r in group])
        decoding = decode_seconds(group)
        decode = speedup_interval(*decoding) if decoding else None
        nan = float("nan")
        entry: dict[str, Any] = {
            "stream": stream, "method": method, "domain": domain, "prompts": len(group),
            "speedup": interval.estimate, "speedup_low": interval.low, "speedup_high": interval.high,
            "decode_speedup": decode.estimate if decode else nan,
            "decode_speedup_low": decode.low if decode else nan,
            "decode_speedup_high": decode.high if decode else nan,
            "prefill_share": (1 - sum(decoding[0]) / sum(r.plain_seconds for r in group)) if decoding else nan,
            "mean_accepted": tally.mean_accepted_tokens,
            "acceptance": tally.acceptance_rate,
            "mean_verify_width": tally.mean_verify_width,
            "tree_share": sum(r.tree_steps for r in group) / tally.steps if tally.steps else 0.0,
            "no_draft_share": (sum(r.no_draft_steps for r in group) / tally.steps
                               if tally.steps and all(r.no_draft_steps is not None for r in group) else float("nan")),
            "identical": sum(r.identical for r in group) / len(group),
            "routing_accuracy": (sum(r.routed_to == r.domain for r in group) / len(group)
                                 if method == "knn" else float("nan")),
        }
        table.append(entry)
    return table


def verdicts(rows: list[PromptRun]) -> list[str]:
    """Plain statements per stream and domain (overall last), one per `pipeline.comparisons.comparisons`: "beats" / "loses to" only
    where the 95% paired-bootstrap interval of the speedup difference excludes zero; otherwise "no significant
    difference from", with the interval; on fewer than MIN_VERDICT_PROMPTS prompts no verdict ("too few
    prompts"). Figures included, whatever the answer."""
    lines = []
    for stream in dict.fromkeys(r.stream for r in rows):
        for domain, count, knn, found in judgements(rows, stream):
            parts = [f"{c.verdict} {c.label} (speedup difference {c.difference.describe(signed=True)}"
                     + (f"; {c.note})" if c.note else ")") for c in found]
            lines.append(f"{stream} stream, {domain} ({count} prompts): KNN-SSD {knn.describe()} "
                         + ("; ".join(parts) if parts else "(no Fix or Mix to compare)"))
    return lines


def out_of_distribution(rows: list[PromptRun]) -> list[str]:
    """Per domain of the "ood" stream: where KNN-SSD routed its prompts, how often it fell back, its speedup."""
    lines = []
    knn = [r for r in rows if r.stream == "ood" and r.method == "knn"]
    for domain in dict.fromkeys(r.domain for r in knn):
        mine = [r for r in knn if r.domain == domain]
        routed: dict[str, int] = {}
        for r in mine:
            routed[r.routed_to] = routed.get(r.routed_to, 0) + 1
        fallback = routed.get("(fallback)", 0)
        interval = speedup_interval([r.plain_seconds for r in mine], [r.seconds for r in mine])
        where = ", ".join(f"{name} {count}" for name, count in sorted(routed.items(), key=lambda kv: -kv[1]))
        lines.append(f"ood stream, {domain} (never calibrated, {len(mine)} prompts): fallback {fallback}/{len(mine)} "
                     f"({fallback / len(mine):.0%}); routed to {where}; KNN-SSD {interval.describe()}")
    return lines


def leaderboard_column(domain: str) -> str | None:
    """The Spec-Bench leaderboard column a domain or category belongs to (None: not a Spec-Bench one)."""
    if domain in MT_BENCH_CATEGORIES or domain in ("chat", "mt_bench"):
        return "mt_bench"
    return domain if domain in LEADERBOARD else None


def leaderboard(rows: list[PromptRun], stream: str) -> str | None:
    """Speedups the way the Spec-Bench leaderboard reports them: its six columns (categories pooled) and
    overall, per method, with 95% intervals; None when no domain is a Spec-Bench category."""
    chosen = [r for r in rows if r.stream == stream]
    columns = [c for c in LEADERBOARD if any(leaderboard_column(r.domain) == c for r in chosen)]
    if not columns:
        return None
    methods = list(dict.fromkeys(r.method for r in chosen if r.method != "plain"))
    lines = [f"{'method':<20}" + "".join(f"{c:>22}" for c in [*columns, OVERALL])]
    for method in methods:
        cells = []
        for column in [*columns, OVERALL]:
            group = [r for r in chosen if r.method == method and column in (OVERALL, leaderboard_column(r.domain))]
            if not group:
                cells.append(f"{'-':>22}")
                continue
            i = speedup_interval([r.plain_seconds for r in group], [r.seconds for r in group])
            cells.append(f"{f'{i.estimate:.2f} [{i.low:.2f},{i.high:.2f}]':>22}")
        lines.append(f"{method:<20}" + "".join(cells))
    return "\n".join(lines)


def optional_float(text: str | None) -> float | None:
    """A CSV cell's float; None for an empty cell or a column the file does not have."""
    return None if text in (None, "") else float(text)


def read_rows(path: Any) -> list[PromptRun]:
    """The rows of a per_prompt.csv written by `write_outputs`."""
    rows = []
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            rows.append(PromptRun(
                stream=r["stream"], order=int(r["order"]), domain=r["domain"], method=r["method"],
                seconds=float(r["seconds"]), plain_seconds=float(r["plain_seconds"]), new_tokens=int(r["new_tokens"]),
                accepted=int(r["accepted"]), drafted=int(r["drafted"]), steps=int(r["steps"]),
                identical=r["identical"] == "True", routed_to=r["routed_to"],
                tree_steps=int(r.get("tree_steps") or 0),
                no_draft_steps=int(r["no_draft_steps"]) if r.get("no_draft_steps") not in (None, "") else None,
                prefill_seconds=optional_float(r.get("prefill_seconds")),
                plain_prefill_seconds=optional_float(r.get("plain_prefill_seconds"))))
    return rows


def plot(table: list[dict[str, Any]], path: Any, title: str) -> None:
    """Figure-1-style grouped bars: speedup per domain (overall last) for each method, one panel per stream."""
    panels = []
    for stream in dict.fromkeys(r["stream"] for r in table):
        rows = [r for r in table if r["stream"] == stream and r["method"] != "plain"]
        domains = [d for d in dict.fromkeys(r["domain"] for r in rows) if d != OVERALL] + [OVERALL]
        cell = {(r["method"], r["domain"]): r for r in rows}
        methods = list(dict.fromkeys(r["method"] for r in rows))
        series = {m: [cell[(m, d)]["speedup"] for d in domains] for m in methods}
        errors = {m: [(cell[(m, d)]["speedup_low"], cell[(m, d)]["speedup_high"]) for d in domains]
                  for m in methods}
        panels.append((f"{title}: {stream} stream (95% intervals)", domains, series, errors))
    bar_chart(Path(path), panels, ylabel="speedup over plain", highlight="knn")


def metric_key(row: dict[str, Any], figure: str) -> str:
    """MLflow metric name, e.g. speedup/task/knn/coding."""
    return f"{figure}/{row['stream']}/{row['method']}/{row['domain']}"


def write_outputs(rows: list[PromptRun], table: list[dict[str, Any]], folder: Any, title: str) -> list[str]:
    """per_prompt.csv, summary.csv, summary.json, speedup.png, report.txt and tables.md (`pipeline.markdown`)
    in `folder`; returns the report."""
    from pipeline.markdown import markdown_tables

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv([asdict(r) for r in rows], folder / "per_prompt.csv")
    write_csv(table, folder / "summary.csv")
    (folder / "summary.json").write_text(json.dumps(table, indent=2))
    plot(table, folder / "speedup.png", title)
    report, streams = [], list(dict.fromkeys(r["stream"] for r in table))
    for stream in streams:
        report += [f"speedup over plain decoding, {stream} stream:", format_table(table, stream), "",
                   f"mean accepted tokens per verify step / mean verify width, {stream} stream:",
                   format_acceptance(table, stream), ""]
        decode = format_decode(table, stream)
        if decode:
            report += [f"the decoding phase alone (each run's prefill taken out; the same computation for every "
                       f"method of ours), {stream} stream:", decode, ""]
        board = leaderboard(rows, stream)
        if board:
            report += [f"Spec-Bench leaderboard columns, {stream} stream (speedup [95% CI]):", board, ""]
    report += verdicts(rows)
    report += out_of_distribution(rows)
    mismatched = sorted({(r.method, r.domain) for r in rows if not r.identical and not r.method.startswith("hf-")})
    report.append("lossless: every method of ours token-identical to plain decoding on every prompt" if not mismatched
                  else f"NOT LOSSLESS: {mismatched}")
    peers = sorted({(r.method, r.domain) for r in rows if not r.identical and r.method.startswith("hf-")})
    if peers:
        report.append(f"transformers' peers differ from plain greedy decoding on: {peers}")
    (folder / "report.txt").write_text("\n".join(report) + "\n")
    (folder / "tables.md").write_text(markdown_tables(table, {s: judgements(rows, s) for s in streams}))
    return report
