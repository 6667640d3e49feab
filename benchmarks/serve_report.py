"""What serve_bench.py measured, summed up: per-request rows, per-block rows, the table per system and concurrency,
the goals with a verdict each, and the files (requests.csv, blocks.csv, summary.csv, summary.md, summary.json).

Definitions. A block is one server answering every prompt once at one concurrency. Per request: TTFT = send to the
first chunk with text; TPOT = (last chunk - first chunk) / (tokens - 1). Per block: throughput = the block's
tokens / its wall time. Per system and concurrency (over its blocks, i.e. the repeats): throughput = the mean of
the blocks' (min-max beside it); TTFT p50 and p99 and TPOT p50 over all its requests; batch size, drafted and
accepted tokens per step = d_sum / d_count of the server's step histograms over its blocks (benchmarks/
serve_scrape.py), "n/a" where the server does not export them. Mismatches: greedy answers of knnssd and
knnssd-plain that differ from knnssd-plain's answer to the same prompt alone (its block at the lowest concurrency
of the run, repeat 0); lossless speculative decoding and batch-invariant batching make it 0.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.bootstrap import speedup_interval

THROUGHPUT_GOAL = 1.5  # knnssd tokens/s over hf-cb's at GOAL_LEVELS
GOAL_LEVELS = (4, 8)
COMPARED = ("knnssd", "knnssd-plain")  # the systems whose answers are checked against plain decoding alone


@dataclass(frozen=True)
class Row:
    """One request."""

    system: str
    concurrency: int
    repeat: int
    prompt: int
    category: str
    ttft: float
    tpot: float
    tokens: int
    seconds: float
    text: str


@dataclass(frozen=True)
class Block:
    """One block: its wall time and the step histograms' (d_sum, d_count) over it (None: not exported)."""

    system: str
    concurrency: int
    repeat: int
    seconds: float
    tokens: int
    steps: dict[str, tuple[float, float]]

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


def reference_answers(rows: list[Row]) -> dict[int, str]:
    """knnssd-plain's answer to each prompt alone: its block at the lowest concurrency, repeat 0 ({} if absent)."""
    plain = [r for r in rows if r.system == "knnssd-plain" and r.repeat == 0]
    if not plain:
        return {}
    lowest = min(r.concurrency for r in plain)
    return {r.prompt: r.text for r in plain if r.concurrency == lowest}


def mismatches(rows: list[Row], reference: dict[int, str]) -> int | None:
    """How many of `rows` differ from the reference answer to their prompt; None where not compared."""
    if not reference or not rows or rows[0].system not in COMPARED:
        return None
    return sum(r.text != reference[r.prompt] for r in rows)


def per_step(blocks: list[Block], key: str) -> float | None:
    if not blocks or any(key not in b.steps for b in blocks):
        return None
    total, count = (sum(b.steps[key][i] for b in blocks) for i in (0, 1))
    return total / count if count else None


def summarise(rows: list[Row], blocks: list[Block]) -> list[dict]:
    """One entry per (system, concurrency), in the order the blocks first ran."""
    reference, table = reference_answers(rows), []
    for system, concurrency in dict.fromkeys((b.system, b.concurrency) for b in blocks):
        mine = [r for r in rows if (r.system, r.concurrency) == (system, concurrency)]
        done = [b for b in blocks if (b.system, b.concurrency) == (system, concurrency)]
        speeds = [b.throughput for b in done]
        entry = {"system": system, "concurrency": concurrency, "requests": len(mine), "blocks": len(done),
                 "throughput": float(np.mean(speeds)), "throughput_min": min(speeds), "throughput_max": max(speeds),
                 "ttft_p50": float(np.percentile([r.ttft for r in mine], 50)),
                 "ttft_p99": float(np.percentile([r.ttft for r in mine], 99)),
                 "tpot_p50": float(np.percentile([r.tpot for r in mine], 50)),
                 "batch_per_step": per_step(done, "batch"), "drafted_per_step": per_step(done, "drafted"),
                 "accepted_per_step": per_step(done, "accepted"), "mismatches": mismatches(mine, reference)}
        base = [r for r in rows if (r.system, r.concurrency) == ("hf", concurrency)]
        if system != "hf" and base and sum(r.tpot for r in base) > 0 and sum(r.tpot for r in mine) > 0:
            prompts = sorted({r.prompt for r in mine})
            mean = lambda rs, p: float(np.mean([r.tpot for r in rs if r.prompt == p]))  # noqa: E731
            interval = speedup_interval([mean(base, p) for p in prompts], [mean(mine, p) for p in prompts])
            entry.update(tpot_gain_vs_hf=interval.estimate, gain_low=interval.low, gain_high=interval.high)
        table.append(entry)
    return table


def find(table: list[dict], system: str, concurrency: int) -> dict | None:
    return next((e for e in table if (e["system"], e["concurrency"]) == (system, concurrency)), None)


def goals(table: list[dict], tpot_baseline_ms: float | None) -> list[tuple[str, str, str]]:
    """(goal, what was measured, verdict: met / not met / not measured / compare by hand) for each goal."""
    out = []
    for level in GOAL_LEVELS:
        goal = f"knnssd throughput >= {THROUGHPUT_GOAL}x hf-cb at concurrency {level}"
        ours, theirs = find(table, "knnssd", level), find(table, "hf-cb", level)
        if ours is None or theirs is None:
            out.append((goal, "-", "not measured"))
            continue
        ratio = ours["throughput"] / theirs["throughput"]
        out.append((goal, f"{ours['throughput']:.1f} vs {theirs['throughput']:.1f} tok/s = {ratio:.2f}x",
                    "met" if ratio >= THROUGHPUT_GOAL else "not met"))
    counted = [e for e in table if e["mismatches"] is not None]
    goal = "greedy answers of knnssd and knnssd-plain equal knnssd-plain's alone (0 mismatches)"
    if counted:
        said = ", ".join(f"{e['system']}@{e['concurrency']} {e['mismatches']}/{e['requests']}" for e in counted)
        out.append((goal, said, "met" if all(e["mismatches"] == 0 for e in counted) else "not met"))
    else:
        out.append((goal, "-", "not measured"))
    goal, ours = "knnssd TPOT p50 at concurrency 1", find(table, "knnssd", 1)
    if ours is None:
        out.append((goal, "-", "not measured"))
    elif tpot_baseline_ms is None:
        out.append((goal, f"{ours['tpot_p50'] * 1e3:.2f} ms", "compare by hand with the earlier run"))
    else:
        out.append((f"{goal} <= {tpot_baseline_ms} ms (--tpot-baseline-ms)", f"{ours['tpot_p50'] * 1e3:.2f} ms",
                    "met" if ours["tpot_p50"] * 1e3 <= tpot_baseline_ms else "not met"))
    return out


def cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def markdown(table: list[dict], goal_rows: list[tuple[str, str, str]]) -> str:
    lines = ["| system | conc | tok/s (min-max) | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | batch/step | "
             "drafted/step | accepted/step | mismatches vs plain alone | TPOT gain vs hf (95% CI) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in table:
        gain = f"{e['tpot_gain_vs_hf']:.2f}x [{e['gain_low']:.2f}, {e['gain_high']:.2f}]" if "gain_low" in e else "-"
        wrong = "-" if e["mismatches"] is None else f"{e['mismatches']}/{e['requests']}"
        lines.append(f"| {e['system']} | {e['concurrency']} | {e['throughput']:.1f} ({e['throughput_min']:.1f}-"
                     f"{e['throughput_max']:.1f}) | {cell(e['ttft_p50'], 1e3, 1)} | {cell(e['ttft_p99'], 1e3, 1)} | "
                     f"{cell(e['tpot_p50'], 1e3)} | {cell(e['batch_per_step'])} | {cell(e['drafted_per_step'])} | "
                     f"{cell(e['accepted_per_step'])} | {wrong} | {gain} |")
    lines += ["", "| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in goal_rows]
    return "\n".join(lines)


def write(out: Path, header: str, rows: list[Row], blocks: list[Block], table: list[dict],
          goal_rows: list[tuple[str, str, str]], args: dict) -> None:
    """requests.csv, blocks.csv, summary.csv, summary.md (header, table, goals) and summary.json in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_answers(rows)
    with open(out / "requests.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])) + ["same_as_plain_alone"])
        writer.writeheader()
        for r in rows:
            same = "" if mismatches([r], reference) is None else str(r.text == reference[r.prompt])
            writer.writerow({**asdict(r), "same_as_plain_alone": same})
    with open(out / "blocks.csv", "w", newline="") as handle:
        fields = ["system", "concurrency", "repeat", "seconds", "tokens", "throughput", "mismatches"]
        fields += [f"{key}_{part}" for key in ("batch", "drafted", "accepted") for part in ("sum", "count")]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for b in blocks:
            mine = [r for r in rows if (r.system, r.concurrency, r.repeat) == (b.system, b.concurrency, b.repeat)]
            record = {"system": b.system, "concurrency": b.concurrency, "repeat": b.repeat, "seconds": b.seconds,
                      "tokens": b.tokens, "throughput": b.throughput, "mismatches": mismatches(mine, reference)}
            for key, (total, count) in b.steps.items():
                record.update({f"{key}_sum": total, f"{key}_count": count})
            writer.writerow(record)
    with open(out / "summary.csv", "w", newline="") as handle:
        fields = list(dict.fromkeys(k for e in table for k in e))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    (out / "summary.md").write_text(f"{header}\n\n{markdown(table, goal_rows)}\n")
    (out / "summary.json").write_text(json.dumps({"header": header, "args": args, "table": table,
                                                  "goals": [dict(goal=g, measured=m, verdict=v)
                                                            for g, m, v in goal_rows]}, indent=2))
