"""The held-out check's verdicts and table (`pipeline.validation`)."""

from __future__ import annotations

from knnssd.bundle.reports import format_validation
from pipeline.validation import distinct_policies, validation_table


def result(domain, speedups):
    return {"domain": domain, "prompts": 3, "policies": {
        name: {"speedup": s, "predicted_speedup": s * 1.02, "mean_accepted_tokens": 1.5, "mismatch_rate": 0.0}
        for name, s in speedups.items()}}


def test_own_policy_wins_only_when_no_other_policy_is_faster_and_a_shared_policy_ties():
    policies = {"code": {"kind": "prompt_lookup"}, "chat": {"kind": "layer_skip", "skip_set": {"attn": [1]}},
                "qa": {"kind": "prompt_lookup"}, "mix": {"kind": "none"}}
    unique, alias = distinct_policies(policies)
    assert list(unique) == ["code", "chat", "mix"] and alias["qa"] == "code"
    table = validation_table([result("code", {"code": 1.3, "chat": 1.1, "mix": 1.0}),
                              result("chat", {"code": 1.2, "chat": 1.1, "mix": 1.0}),
                              result("qa", {"code": 1.1, "chat": 1.0, "mix": 1.0})], policies, alias)
    domains = table["domains"]
    assert domains["code"]["own_wins"] is True
    assert domains["chat"]["own_wins"] is False and domains["chat"]["best_other"] == "code"
    assert domains["qa"]["own_wins"] is True  # qa's policy is code's: measured once, it ties with itself
    assert domains["qa"]["speedups"]["qa"] == domains["qa"]["speedups"]["code"] == 1.1
    assert abs(table["median_abs_prediction_error"] - 0.02) < 1e-9
    text = format_validation(table)
    assert "no (code 1.200)" in text and "Own policy wins in 2/3 domains" in text and "median |error| 2.0%" in text
