"""KNN-SSD against its baselines in the domain-shift study: paired series of seconds, comparisons, verdicts.

Every method decodes the same prompts, so each comparison is a paired bootstrap (`pipeline.bootstrap`) of the
speedup difference, KNN-SSD minus the baseline: Self-SD(Fix) (the mean of the fixed policies), Self-SD(Mix),
and each of `other_methods` (extra named policies such as a single-path prompt lookup, and transformers'
assisted generation). `pipeline.report` writes them as sentences, `pipeline.markdown` as a table. Rows are
`pipeline.report.PromptRun`s (stream, order, domain, method, seconds, plain_seconds, ...). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.bootstrap import (MIN_VERDICT_PROMPTS, TOO_FEW, Interval, difference_interval, speedup_interval,
                                verdict)
from pipeline.evalconfig import BUILT_IN_METHODS, PEERS

OVERALL = "overall"


def paired(rows: Sequence[Any], stream: str, domain: str) -> tuple[list[float], dict[str, list[float]]]:
    """Plain seconds and each method's seconds on the same prompts of (stream, domain; OVERALL: all), in
    prompt order; a method missing any of those prompts is left out."""
    chosen = [r for r in rows if r.stream == stream and domain in (OVERALL, r.domain)]
    orders = sorted({r.order for r in chosen})
    by = {(r.method, r.order): r for r in chosen}
    plain = {r.order: r.plain_seconds for r in chosen}
    methods = dict.fromkeys(r.method for r in chosen)
    return ([plain[o] for o in orders],
            {m: [by[(m, o)].seconds for o in orders] for m in methods if all((m, o) in by for o in orders)})


def other_methods(methods: list[str]) -> list[str]:
    """Methods KNN-SSD is judged against besides Fix and Mix: extra named policies (e.g. single-path prompt
    lookup) and transformers' assisted generation."""
    return [m for m in methods if m in PEERS or (m not in BUILT_IN_METHODS and not m.startswith("fix-"))]


@dataclass(frozen=True)
class Comparison:
    """KNN-SSD against one baseline on the same prompts: the verdict, the interval of the paired speedup
    difference (KNN-SSD minus the baseline; for Self-SD(Fix), minus the mean of the fixed policies), a note."""

    label: str
    verdict: str
    difference: Interval
    note: str = ""


def comparisons(plain: list[float], seconds: dict[str, list[float]]) -> list[Comparison]:
    """KNN-SSD against Self-SD(Fix) (the mean of the fixed policies, and how many of them it beats), Self-SD(Mix),
    and each of `other_methods` (e.g. a single-path prompt lookup given by --policy), from `paired` series."""
    knn, count = seconds["knn"], len(plain)
    found = []
    fixes = sorted(m for m in seconds if m.startswith("fix-"))
    if fixes:
        difference = difference_interval(plain, knn, [seconds[f] for f in fixes])
        on_average = verdict(difference, count)
        each = [verdict(difference_interval(plain, knn, [seconds[f]]), count) for f in fixes]
        note = (f"verdicts need {MIN_VERDICT_PROMPTS} prompts" if on_average == TOO_FEW else
                f"significantly above {each.count('beats')}, below {each.count('loses to')} of "
                f"{len(fixes)} fixed policies")
        found.append(Comparison("Self-SD(Fix) on average", on_average, difference, note))
    for name, label in [("mix", "Self-SD(Mix)")] + [(m, f'"{m}"') for m in other_methods(list(seconds))]:
        if name in seconds:
            difference = difference_interval(plain, knn, [seconds[name]])
            found.append(Comparison(label, verdict(difference, count), difference))
    return found


def judgements(rows: Sequence[Any], stream: str) -> list[tuple[str, int, Interval, list[Comparison]]]:
    """Per domain of `stream` (overall last) where KNN-SSD ran: (domain, prompts, KNN-SSD's speedup, its
    `comparisons`)."""
    found = []
    for domain in list(dict.fromkeys(r.domain for r in rows if r.stream == stream)) + [OVERALL]:
        plain, seconds = paired(rows, stream, domain)
        if "knn" in seconds:
            found.append((domain, len(plain), speedup_interval(plain, seconds["knn"]), comparisons(plain, seconds)))
    return found
