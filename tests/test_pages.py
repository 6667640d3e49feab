"""The bundle view's state (`registry.pages.shared_view`), without a browser: per-domain speedups first."""

from __future__ import annotations

import json

from registry.pages import shared_view


def manifest(*domains: str) -> dict:
    return {"domains": [{"name": d} for d in domains], "reference_policies": {"mix": {}}}


def test_the_view_orders_speedups_first_and_keeps_other_bundles_columns():
    first = json.loads(shared_view(None, manifest("code", "chat")))
    state = json.loads(shared_view(json.dumps({**first, "orderByKey": "x"}), manifest("code", "math")))
    columns = state["selectedColumns"]
    assert state["columnOrder"] == columns and state["orderByKey"] == "x"  # the table's other settings stay
    assert columns[:4] == ["metrics.`speedup/code`", "metrics.`speedup/chat`", "metrics.`speedup/mix`",
                           "metrics.`speedup/math`"]
    groups = [c.split("`")[1].split("/")[0] if c.startswith("metrics") else "kind" for c in columns]
    assert groups == sorted(groups, key=["speedup", "mean_accepted_tokens", "heldout_own_wins", "kind"].index)
