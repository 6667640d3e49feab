"""The knnssd server's per-step histograms, read from its /metrics before and after a block of requests: the
block's share is the difference of each histogram's _sum and _count (summed over any labels), so the mean over
the block is d_sum / d_count.

    knnssd_batch_size              requests per verify step (one observation per batched forward)
    knnssd_step_drafted_tokens     drafted tokens per request-step
    knnssd_step_accepted_tokens    accepted drafted tokens per request-step

A server that does not export one (before request batching) leaves it out; the report then says "n/a".
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

STEP_HISTOGRAMS = {"batch": "knnssd_batch_size", "drafted": "knnssd_step_drafted_tokens",
                   "accepted": "knnssd_step_accepted_tokens"}


@dataclass(frozen=True)
class Totals:
    """(sum, count) of each step histogram the server exports, keyed as in STEP_HISTOGRAMS."""

    values: dict[str, tuple[float, float]]

    def minus(self, earlier: "Totals") -> "Totals":
        return Totals({key: (s - earlier.values[key][0], c - earlier.values[key][1])
                       for key, (s, c) in self.values.items() if key in earlier.values})


def read_totals(url: str) -> Totals:
    """The step histograms' totals now, from GET url/metrics (Prometheus text, parsed by prometheus_client)."""
    try:
        text = httpx.get(url + "/metrics", timeout=30).raise_for_status().text
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: GET {url}/metrics failed: {exc} (fix: see the server's log)") from exc
    return parse_totals(text)


def parse_totals(text: str) -> Totals:
    """The step histograms' totals in a Prometheus text body."""
    keys = {name: key for key, name in STEP_HISTOGRAMS.items()}
    values = {}
    for family in text_string_to_metric_families(text):
        key = keys.get(family.name)
        if key is None:
            continue
        total = count = 0.0
        for sample in family.samples:
            if sample.name == family.name + "_sum":
                total += sample.value
            elif sample.name == family.name + "_count":
                count += sample.value
        values[key] = (total, count)
    return Totals(values)
