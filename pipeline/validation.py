"""The held-out check at the end of calibration: does each domain's own policy win on its held-out prompts?

Every domain's held-out prompts are decoded with every distinct policy of the bundle (each domain's, and the mix
study's), timed against plain decoding (`pipeline.measure`) and predicted by replay (`pipeline.scoring`). Per
domain the verdict is the paper's claim, yes or no: its own policy is at least as fast in wall clock as every
other policy there (a policy shared with another domain is one measurement, so it ties with itself).

    prediction error of a (domain, policy) = predicted speedup / wall-clock speedup - 1
    agreement                              = median of |prediction error| over all of them
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from knnssd.engine.policy import describe_policy
from knnssd.bundle.reports import format_validation  # noqa: F401 - printed by calibration, defined beside the bundle's reports

MIX_NAME = "mix"


def distinct_policies(policies: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(one name per distinct policy -> policy, every name -> the name it is measured under)."""
    first: dict[str, str] = {}
    alias = {}
    for name, policy in policies.items():
        key = json.dumps(policy, sort_keys=True)
        alias[name] = first.setdefault(key, name)
    return {name: policies[name] for name in dict.fromkeys(alias.values())}, alias


def validation_table(results: list[dict[str, Any]], policies: dict[str, dict[str, Any]],
                     alias: dict[str, str]) -> dict[str, Any]:
    """The JSON the bundle keeps: per domain, held-out speedups by policy name and the verdict; the agreement
    of predicted and wall-clock speedups."""
    domains = {}
    errors = []
    for result in results:
        domain = result["domain"]
        measured = result["policies"]
        by_policy = {name: measured[alias[name]] for name in policies}
        own = by_policy[domain]["speedup"]
        others = {name: row["speedup"] for name, row in by_policy.items() if name != domain}
        best_other = max(others, key=others.get) if others else None
        wins = best_other is None or own >= others[best_other] or alias[best_other] == alias[domain]
        domains[domain] = {
            "prompts": result["prompts"], "own_wins": bool(wins), "own_speedup": own,
            "best_other": best_other, "best_other_speedup": others.get(best_other) if best_other else None,
            "speedups": {name: row["speedup"] for name, row in by_policy.items()},
            "predicted_speedups": {name: row["predicted_speedup"] for name, row in by_policy.items()},
            "mean_accepted_tokens": {name: row["mean_accepted_tokens"] for name, row in by_policy.items()},
            "mismatch_rate": max(row["mismatch_rate"] for row in measured.values())}
        errors.extend(row["predicted_speedup"] / row["speedup"] - 1 for row in measured.values())
    return {"domains": domains, "policies": {name: describe_policy(p) for name, p in policies.items()},
            "median_abs_prediction_error": statistics.median(abs(e) for e in errors) if errors else None,
            "prediction_errors": errors}
