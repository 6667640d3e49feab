"""Draft policies as JSON objects (the form bundles store) and the drafters they make.

    {"kind": "none"}                                            plain decoding
    {"kind": "layer_skip", "skip_set": {"attn": [...], "mlp": [...]},
     "threshold": 0.8, "max_draft_tokens": 12, "adaptive": false}  layer-skip drafting
"""

from __future__ import annotations

from typing import Any

from knnssd.drafters import DraftConfig, Drafter, LayerSkipDrafter
from knnssd.errors import KnnSsdError
from knnssd.skipset import SkipSet

DRAFT_CONFIG_KEYS = ("threshold", "max_draft_tokens", "keep_unconfident", "adaptive", "adapt_step", "min_threshold", "max_threshold")


def policy_of(drafter: Drafter | None) -> dict[str, Any]:
    """The JSON policy of a drafter (None = plain decoding)."""
    return {"kind": "none"} if drafter is None else drafter.describe()


def drafter_from_policy(policy: dict[str, Any], num_layers: int) -> Drafter | None:
    """The drafter a policy describes, validated against a model of `num_layers` layers."""
    kind = policy.get("kind") if isinstance(policy, dict) else None
    if kind == "none":
        return None
    if kind == "layer_skip":
        skip_set = SkipSet.from_dict(policy.get("skip_set", {})).validate(num_layers)
        config = DraftConfig(**{key: policy[key] for key in DRAFT_CONFIG_KEYS if key in policy})
        return LayerSkipDrafter(skip_set, config)
    raise KnnSsdError(f"unknown draft policy kind {kind!r}", fix="use 'layer_skip' or 'none' (upgrade knnssd?)")
