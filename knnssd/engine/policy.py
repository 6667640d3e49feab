"""Draft policies as JSON objects (the form bundles store) and the drafters they make.

    {"kind": "none"}                                                 plain decoding
    {"kind": "layer_skip", "skip_set": {"attn": [...], "mlp": [...]},
     "threshold": 0.8, "max_draft_tokens": 12, "adaptive": false}       layer-skip drafting (LayerSkipConfig)
    {"kind": "prompt_lookup", "max_ngram": 3, "min_ngram": 1,
     "max_draft_tokens": 10}                                          n-gram lookup (PromptLookupConfig)
    {"kind": "hybrid", "prompt_lookup": {...}, "layer_skip": {...}}   lookup, else layer skipping
                                                                      (the two objects without "kind")
    {"kind": "suffix_tree", "max_ngram": 4, "min_ngram": 1, "max_occurrences": 16,
     "max_depth": 10, "max_tree_nodes": 15, "min_path_prob": 0.1,    a token tree of the latest suffix's
     "use_store": false}                                              continuations (SuffixTreeConfig), in
                                                                      the text and, with use_store, in the
                                                                      store the drafter is made with;
     optional, off by default: "spec_factor": 1.0, "spec_offset": 0   a match of n tokens drafts at most
                                                                      int(factor * n + offset) deep;
     "recycled_nodes": 8, "recycled_k": 8                             up to 8 more nodes from the model's own
                                                                      top-8 successors of each token
     "use_warm": false                                                with true (and recycled_nodes > 0), each
                                                                      generation's successors start from the
                                                                      warm table the drafter is made with (a
                                                                      domain's, shipped in its bundle)
     "store_scope": "own"                                             with use_store: "own" drafts from the
                                                                      domain's store, "union" from the union of
                                                                      every domain's store, "both" per step from
                                                                      whichever gives the larger expected tree
                                                                      (the own store winning ties)

Field names and defaults are those of the config classes; a field a policy leaves out takes its class default,
and a field the class does not have, or of the wrong JSON type, is refused.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from knnssd.engine.checks import config_from_json
from knnssd.engine.drafters import (Drafter, HybridDrafter, LayerSkipConfig, LayerSkipDrafter, PromptLookupConfig,
                             PromptLookupDrafter, SuccessorTable, SuffixStore, SuffixTreeConfig,
                             SuffixTreeDrafter)
from knnssd.errors import KnnSsdError
from knnssd.engine.jsonarg import json_source
from knnssd.engine.skipset import SkipSet

POLICY_KINDS = ("none", "layer_skip", "prompt_lookup", "hybrid", "suffix_tree")


def policy_of(drafter: Drafter | None) -> dict[str, Any]:
    """The JSON policy of a drafter (None = plain decoding)."""
    return {"kind": "none"} if drafter is None else drafter.describe()


def _fields(policy: dict[str, Any], kind: str) -> dict[str, Any]:
    if not isinstance(policy, dict):
        raise KnnSsdError(f"the {kind} part of a draft policy must be a JSON object, got {policy!r}",
                          fix=f'write e.g. "{kind}": {{}} for its defaults')
    return {k: v for k, v in policy.items() if k != "kind"}


def layer_skip_parts(policy: dict[str, Any]) -> tuple[SkipSet, LayerSkipConfig]:
    """The skip set (not yet checked against a model) and drafting config of a layer-skip policy (or part)."""
    data = _fields(policy, "layer_skip")
    skip_set = SkipSet.from_dict(data.pop("skip_set", {}))
    return skip_set, config_from_json(LayerSkipConfig, data, "the layer_skip policy")


def lookup_config(policy: dict[str, Any]) -> PromptLookupConfig:
    """The config of a prompt-lookup policy (or the prompt_lookup part of a hybrid)."""
    return config_from_json(PromptLookupConfig, _fields(policy, "prompt_lookup"), "the prompt_lookup policy")


def suffix_tree_config(policy: dict[str, Any]) -> SuffixTreeConfig:
    """The config of a suffix-tree policy."""
    return config_from_json(SuffixTreeConfig, _fields(policy, "suffix_tree"), "the suffix_tree policy")


def _layer_skip(policy: dict[str, Any], num_layers: int) -> LayerSkipDrafter:
    skip_set, config = layer_skip_parts(policy)
    return LayerSkipDrafter(skip_set.validate(num_layers), config)


def _hybrid_parts(policy: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = policy.get("prompt_lookup"), policy.get("layer_skip")
    extra = sorted(set(policy) - {"kind", "prompt_lookup", "layer_skip"})
    if not all(isinstance(part, dict) for part in parts) or extra:
        raise KnnSsdError("a hybrid policy needs the objects 'prompt_lookup' and 'layer_skip', and nothing else"
                          + (f" (it has {extra})" if extra else ""),
                          fix='write {"kind": "hybrid", "prompt_lookup": {...}, "layer_skip": {"skip_set": ...}}')
    return parts[0], parts[1]


def _kind(policy: Any) -> str:
    kind = policy.get("kind") if isinstance(policy, dict) else None
    if kind not in POLICY_KINDS:
        raise KnnSsdError(f"unknown draft policy kind {kind!r}",
                          fix=f"use one of {', '.join(POLICY_KINDS)} (a newer bundle may need a newer knnssd)")
    return kind


def uses_store(policy: dict[str, Any]) -> bool:
    """Whether a (valid) policy drafts from a store: a suffix tree with use_store."""
    return _kind(policy) == "suffix_tree" and suffix_tree_config(policy).use_store


def uses_warm(policy: dict[str, Any]) -> bool:
    """Whether a (valid) policy starts its recycled successors from a warm table: a suffix tree with use_warm."""
    return _kind(policy) == "suffix_tree" and suffix_tree_config(policy).use_warm


def uses_union(policy: dict[str, Any]) -> bool:
    """Whether a (valid) policy drafts from the union of every domain's store: a suffix tree with use_store and
    store_scope "union" or "both"."""
    return uses_store(policy) and suffix_tree_config(policy).store_scope != "own"


def uses_own_store(policy: dict[str, Any]) -> bool:
    """Whether a (valid) policy drafts from its own domain's store: a suffix tree with use_store and store_scope
    "own" or "both"."""
    return uses_store(policy) and suffix_tree_config(policy).store_scope != "union"


def indexed(store: Sequence[Sequence[int]] | SuffixStore, config: SuffixTreeConfig) -> SuffixStore:
    """`store` indexed for `config`'s n-gram sizes: token arrays indexed now, or a `SuffixStore` already indexed
    for exactly those sizes (one index shared by several drafters) as it is."""
    if isinstance(store, SuffixStore):
        if sorted(store.index.orders) != list(range(config.min_ngram, config.max_ngram + 1)):
            raise KnnSsdError(f"the indexed store given covers n-grams {sorted(store.index.orders)}, but the policy "
                              f"matches {config.min_ngram}..{config.max_ngram}",
                              fix="index it with this policy's config (SuffixStore.of(arrays, config)) or pass the "
                                  "token arrays")
        return store
    return SuffixStore.of(store, config)


def drafter_from_policy(policy: dict[str, Any], num_layers: int,
                        store: Sequence[Sequence[int]] | SuffixStore | None = None,
                        successors: SuccessorTable | None = None,
                        union_store: Sequence[Sequence[int]] | SuffixStore | None = None) -> Drafter | None:
    """The drafter a policy describes, validated against a model of `num_layers` layers.

    `store`: token arrays (e.g. a bundle's store for the policy's domain) that a suffix-tree policy with
    use_store and store_scope "own" or "both" drafts from; `union_store`: the union of every domain's arrays,
    that one with store_scope "union" or "both" drafts from; such a policy without the store(s) it needs is
    refused; either may also be given indexed (`SuffixStore`, see `indexed`). `successors`: the warm table (vocab, k) a suffix-tree policy with use_warm starts its recycled
    successors from (a bundle's, for the policy's domain); such a policy without one is refused. Other
    policies ignore all three."""
    kind = _kind(policy)
    if kind == "none":
        if set(policy) != {"kind"}:
            raise KnnSsdError(f"a 'none' policy has no fields, got {sorted(set(policy) - {'kind'})}",
                              fix='write {"kind": "none"}')
        return None
    if kind == "layer_skip":
        return _layer_skip(policy, num_layers)
    if kind == "prompt_lookup":
        return PromptLookupDrafter(lookup_config(policy))
    if kind == "suffix_tree":
        config = suffix_tree_config(policy)
        if config.use_warm and successors is None:
            raise KnnSsdError("this suffix_tree policy starts from a warm successor table (use_warm true) but none "
                              "was given", fix="use the policy through its bundle (which ships the table), pass "
                                               'successors=..., or set "use_warm": false')
        warm = successors if config.use_warm else None
        if not config.use_store:
            return SuffixTreeDrafter(config, None, warm)
        own, union = config.store_scope != "union", config.store_scope != "own"
        if own and store is None:
            raise KnnSsdError("this suffix_tree policy drafts from a store (use_store true) but none was given",
                              fix="use the policy through its bundle (which ships the store), pass store=..., "
                                  'or set "use_store": false')
        if union and union_store is None:
            raise KnnSsdError(f"this suffix_tree policy drafts from the union of every domain's store (store_scope "
                              f"{config.store_scope!r}) but no union was given",
                              fix='use the policy through its bundle (which ships every store), pass '
                                  'union_store=..., or set "store_scope": "own"')
        return SuffixTreeDrafter(config, indexed(store, config) if own else None, warm,
                                 indexed(union_store, config) if union else None)
    lookup, layer_skip = _hybrid_parts(policy)
    return HybridDrafter(PromptLookupDrafter(lookup_config(lookup)), _layer_skip(layer_skip, num_layers))


def parse_policy(text: str) -> dict[str, Any]:
    """A policy from inline JSON or from the path of a JSON file (as `--policy` takes it, like `--skip-set`)."""
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
    """One line for tables: e.g. 'layer_skip attn[25] mlp[] t=0.8 k<=12' or 'prompt_lookup n=1-3 k<=10'.
    Fields the policy leaves out show their defaults."""
    kind = _kind(policy)
    if kind == "layer_skip":
        skip, config = layer_skip_parts(policy)
        return (f"layer_skip attn{list(skip.attn)} mlp{list(skip.mlp)} "
                f"t={config.threshold} k<={config.max_draft_tokens}")
    if kind == "prompt_lookup":
        config = lookup_config(policy)
        return f"prompt_lookup n={config.min_ngram}-{config.max_ngram} k<={config.max_draft_tokens}"
    if kind == "suffix_tree":
        tree = suffix_tree_config(policy)
        return (f"suffix_tree n={tree.min_ngram}-{tree.max_ngram} occ<={tree.max_occurrences} "
                f"depth<={tree.max_depth} nodes<={tree.max_tree_nodes} p>={tree.min_path_prob}"
                + ((" +store" + ("" if tree.store_scope == "own" else f"({tree.store_scope})"))
                   if tree.use_store else "")
                + (f" depth<={tree.spec_factor}n{tree.spec_offset:+d}" if tree.spec_factor > 0 else "")
                + (f" +recycled {tree.recycled_nodes}x{tree.recycled_k}" if tree.recycled_nodes else "")
                + (" +warm" if tree.use_warm else ""))
    if kind == "hybrid":
        lookup, layer_skip = _hybrid_parts(policy)
        return (f"hybrid({describe_policy({'kind': 'prompt_lookup', **lookup})}; "
                f"else {describe_policy({'kind': 'layer_skip', **layer_skip})})")
    return kind
