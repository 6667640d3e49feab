"""Draft policies as JSON objects (the form bundles store) and the drafters they make.

    {"kind": "none"}                                                 plain decoding
    {"kind": "layer_skip", "skip_set": {"attn": [...], "mlp": [...]},
     "threshold": 0.8, "max_draft_tokens": 12, "adaptive": false}       layer-skip drafting
    {"kind": "prompt_lookup", "max_ngram": 3, "min_ngram": 1,
     "max_draft_tokens": 10}                                          n-gram lookup in prompt + output
    {"kind": "hybrid", "prompt_lookup": {...}, "layer_skip": {...}}   lookup, else layer skipping
                                                                      (the two objects without "kind")
"""

from __future__ import annotations

from typing import Any

from knnssd.drafters import DraftConfig, Drafter, LayerSkipDrafter
from knnssd.errors import KnnSsdError
from knnssd.hybrid import HybridDrafter
from knnssd.jsonarg import json_source
from knnssd.lookup import PromptLookupConfig, PromptLookupDrafter
from knnssd.skipset import SkipSet

DRAFT_CONFIG_KEYS = ("threshold", "max_draft_tokens", "keep_unconfident", "adaptive", "adapt_step", "min_threshold",
                     "max_threshold")
LOOKUP_CONFIG_KEYS = ("max_ngram", "min_ngram", "max_draft_tokens")
POLICY_KINDS = ("none", "layer_skip", "prompt_lookup", "hybrid")


def policy_of(drafter: Drafter | None) -> dict[str, Any]:
    """The JSON policy of a drafter (None = plain decoding)."""
    return {"kind": "none"} if drafter is None else drafter.describe()


def _layer_skip(policy: dict[str, Any], num_layers: int) -> LayerSkipDrafter:
    skip_set = SkipSet.from_dict(policy.get("skip_set", {})).validate(num_layers)
    return LayerSkipDrafter(skip_set, DraftConfig(**{key: policy[key] for key in DRAFT_CONFIG_KEYS if key in policy}))


def _lookup(policy: dict[str, Any]) -> PromptLookupDrafter:
    return PromptLookupDrafter(PromptLookupConfig(**{key: policy[key] for key in LOOKUP_CONFIG_KEYS if key in policy}))


def drafter_from_policy(policy: dict[str, Any], num_layers: int) -> Drafter | None:
    """The drafter a policy describes, validated against a model of `num_layers` layers."""
    kind = policy.get("kind") if isinstance(policy, dict) else None
    if kind == "none":
        return None
    if kind == "layer_skip":
        return _layer_skip(policy, num_layers)
    if kind == "prompt_lookup":
        return _lookup(policy)
    if kind == "hybrid":
        parts = [policy.get("prompt_lookup"), policy.get("layer_skip")]
        if not all(isinstance(part, dict) for part in parts):
            raise KnnSsdError("a hybrid policy needs the objects 'prompt_lookup' and 'layer_skip'",
                              fix='write {"kind": "hybrid", "prompt_lookup": {...}, "layer_skip": {"skip_set": ...}}')
        return HybridDrafter(_lookup(parts[0]), _layer_skip(parts[1], num_layers))
    raise KnnSsdError(f"unknown draft policy kind {kind!r}",
                      fix=f"use one of {', '.join(POLICY_KINDS)} (a newer bundle may need a newer knnssd)")


def parse_policy(text: str) -> dict[str, Any]:
    """A policy from inline JSON or from the path of a JSON file (as `--policy` takes it, like `--skip-set`)."""
    import json

    source = json_source(text, "--policy", '{"kind": "prompt_lookup", "max_ngram": 3}')
    try:
        policy = json.loads(source)
    except json.JSONDecodeError as exc:
        raise KnnSsdError(f"the draft policy is not valid JSON ({exc.msg}): {text[:80]!r}",
                          fix='write e.g. \'{"kind": "prompt_lookup", "max_ngram": 3}\'') from None
    if not isinstance(policy, dict):
        raise KnnSsdError("a draft policy must be a JSON object", fix='write e.g. {"kind": "prompt_lookup"}')
    return policy


def describe_policy(policy: dict[str, Any]) -> str:
    """One line for tables: e.g. 'layer_skip attn[25] mlp[] t=0.8 k<=12' or 'prompt_lookup n=1-3 k<=10'."""
    kind = policy.get("kind")
    if kind == "layer_skip":
        skip = policy.get("skip_set", {})
        return (f"layer_skip attn{skip.get('attn', [])} mlp{skip.get('mlp', [])} "
                f"t={policy.get('threshold', DraftConfig.threshold)} k<={policy.get('max_draft_tokens', 12)}")
    if kind == "prompt_lookup":
        return (f"prompt_lookup n={policy.get('min_ngram', 1)}-{policy.get('max_ngram', 3)} "
                f"k<={policy.get('max_draft_tokens', 10)}")
    if kind == "hybrid":
        lookup = describe_policy({"kind": "prompt_lookup", **policy.get("prompt_lookup", {})})
        layer_skip = describe_policy({"kind": "layer_skip", **policy.get("layer_skip", {})})
        return f"hybrid({lookup}; else {layer_skip})"
    return str(kind)
