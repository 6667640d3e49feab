"""What a policy search searches, and its settings: `SearchConfig`, the seeds, each kind's share, the space.

A trial first picks the drafter kind among `SearchConfig.kinds`, then that kind's parameters (conditional
parameters, which TPE handles):
  layer_skip     the 2L binary choices "skip attention / MLP of layer i", the confidence threshold, and the
                 maximum draft length;
  prompt_lookup  the largest and smallest n-gram sizes, and the maximum draft length;
  hybrid         both sets above (lookup where the text matches, layer skipping elsewhere);
  suffix_tree    the n-gram sizes, the occurrences merged, the tree's node budget and depth, the least path
                 probability kept, the adaptive depth (spec factor and offset), the recycled successors' node
                 budget and k and, only where the domain has a store (`has_store`), whether to draft from it,
                 and, only where its store has successors (`has_warm`) and the trial recycles (recycled_nodes >
                 0), whether to start from the domain's warm successor table (`use_warm`), and, only where
                 the trial drafts from the store and the domain's store carries a union of more than its own
                 data (`has_union`), which store (`store_scope`: own, union of every domain's, or both).
The first trials of a new study are seeds (`seed_trials`), then trials with only the kind fixed
(`kind_quota`). Trials whose skip ratio falls outside [min_skip_ratio, max_skip_ratio] are pruned before any
work (`pipeline.search`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from knnssd.engine.drafters import LayerSkipConfig, PromptLookupConfig, SuffixTreeConfig
from knnssd.engine.drafters.suffix_tree import STORE_SCOPES
from knnssd.errors import KnnSsdError
from knnssd.engine.skipset import SkipSet

# Bumped whenever the objective's measurement or search space changes, so a resumed study never mixes
# incomparable trials.
# 12: suffix trees may draft from the union of every domain's store (store_scope); 11: suffix trees may start from the warm successor table (use_warm); 10: suffix trees search recycled_nodes
# over (0, 4, 8, 12, 16) (9 held it at 0); 9: suffix trees search
# recycled successors and the adaptive depth; 8: the plain step priced as timed, not pooled with wider passes;
# 7: suffix-tree policies and stores; 6: prefill priced from the table, draft forwards at their context
MEASUREMENT_VERSION = 12
SEARCHABLE_KINDS = ("layer_skip", "prompt_lookup", "hybrid", "suffix_tree")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LAYER_SKIP_DRAFT_RANGE = (2, 12)  # max_draft_tokens searched for layer skipping
LOOKUP_DRAFT_RANGE = (2, 15)  # max_draft_tokens searched for prompt lookup (widths up to 16: the fast kernels)
NGRAM_RANGE = (1, 4)  # max_ngram
MIN_NGRAM_RANGE = (1, 2)  # min_ngram (at most max_ngram)
TREE_NODES_RANGE = (4, 15)  # suffix_tree max_tree_nodes: verify widths up to 16, what the step-cost table times
TREE_DEPTH_RANGE = (2, 10)  # suffix_tree max_depth
PATH_PROBS = (0.02, 0.05, 0.1, 0.2, 0.3)  # suffix_tree min_path_prob
OCCURRENCES = (4, 8, 16, 32)  # suffix_tree max_occurrences
SPEC_FACTORS = (0.0, 1.0, 2.0, 4.0)  # suffix_tree spec_factor (0: no adaptive depth)
SPEC_OFFSETS = (-1, 0, 1, 2)  # suffix_tree spec_offset (read only where spec_factor > 0)
# suffix_tree recycled_nodes (0: off), added to max_tree_nodes: a tree of 15 + 16 nodes is a verify pass of width
# 32, priced past the step-cost table's widest timed pass by its last segment's slope (pipeline.costs). Every
# trace a trial or a confirmation replays on carries the successors (pipeline.traces.with_successors).
RECYCLED_NODES = (0, 4, 8, 12, 16)
RECYCLED_K = (2, 4, 8)  # suffix_tree recycled_k


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 100
    prompts_per_trial: int = 16  # the most calibration prompts a trial is scored on (a domain with fewer: all)
    max_new_tokens: int = 32
    sampler: str = "tpe"
    seed: int = 0
    min_skip_ratio: float = 0.01
    max_skip_ratio: float = 0.5
    min_speedup: float = 1.0
    confirm_candidates: int = 3
    confirm_prompts: int = 8
    confirm_rounds: int = 1  # more rounds changed 1 choice of 19 logged, by +0.018 (docs/calibration.md)
    workers: int = 1
    kind_share: float = 0.15
    kinds: tuple[str, ...] = SEARCHABLE_KINDS
    seed_layer_skip: LayerSkipConfig = LayerSkipConfig()
    seed_lookup: PromptLookupConfig = PromptLookupConfig()
    seed_tree: SuffixTreeConfig = SuffixTreeConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [kind for kind in self.kinds if kind not in SEARCHABLE_KINDS]
        if unknown or not self.kinds:
            raise KnnSsdError(f"unknown or no drafter kinds to search: {', '.join(unknown) or '(none)'}",
                              fix=f"choose from {','.join(SEARCHABLE_KINDS)}, e.g. --policies layer_skip,prompt_lookup")
        if self.trials < 1:
            raise KnnSsdError(f"--trials must be >= 1, got {self.trials}", fix="run at least one trial per domain")
        if self.prompts_per_trial < 1:
            raise KnnSsdError("--prompts-per-trial must be >= 1", fix="use e.g. 4")
        if self.max_new_tokens < 2:
            raise KnnSsdError("--max-new-tokens must be >= 2 (one token leaves nothing to draft)", fix="use e.g. 32")
        if self.confirm_rounds < 1:
            raise KnnSsdError("--confirm-rounds must be >= 1", fix="use 1, or more to let wall clock overrule the "
                              "prediction more often")
        if self.confirm_candidates < 1:
            raise KnnSsdError("--confirm-candidates must be >= 1", fix="use e.g. 3")
        if self.confirm_prompts < 1:
            raise KnnSsdError("--confirm-prompts must be >= 1", fix="use e.g. 8")
        if self.workers < 1:
            raise KnnSsdError("--workers-per-domain must be >= 1", fix="use 1, or the GPUs per domain")
        if not 0.0 <= self.kind_share * len(self.kinds) <= 1.0:
            raise KnnSsdError(f"--kind-share {self.kind_share} must be in [0, 1 / {len(self.kinds)} kinds]: each kind's "
                              "guaranteed share of the budget",
                              fix=f"use at most {1 / len(self.kinds):.2f}, e.g. 0.15")
        if self.sampler not in ("tpe", "random"):
            raise KnnSsdError(f"unknown sampler {self.sampler!r}", fix="use tpe or random")
        if not 0.0 <= self.min_skip_ratio <= self.max_skip_ratio < 1.0:
            raise KnnSsdError("need 0 <= min_skip_ratio <= max_skip_ratio < 1", fix="e.g. 0.01 and 0.5")
        if self.seed_layer_skip.threshold not in THRESHOLDS:
            raise KnnSsdError(f"the seed threshold {self.seed_layer_skip.threshold} is not on the search grid",
                              fix=f"choose one of {', '.join(map(str, THRESHOLDS))}")
        for name, value, (low, high) in (
                ("layer-skip max_draft_tokens", self.seed_layer_skip.max_draft_tokens, LAYER_SKIP_DRAFT_RANGE),
                ("prompt-lookup max_draft_tokens", self.seed_lookup.max_draft_tokens, LOOKUP_DRAFT_RANGE),
                ("prompt-lookup max_ngram", self.seed_lookup.max_ngram, NGRAM_RANGE),
                ("prompt-lookup min_ngram", self.seed_lookup.min_ngram, MIN_NGRAM_RANGE),
                ("suffix-tree max_ngram", self.seed_tree.max_ngram, NGRAM_RANGE),
                ("suffix-tree min_ngram", self.seed_tree.min_ngram, MIN_NGRAM_RANGE),
                ("suffix-tree max_tree_nodes", self.seed_tree.max_tree_nodes, TREE_NODES_RANGE),
                ("suffix-tree max_depth", self.seed_tree.max_depth, TREE_DEPTH_RANGE)):
            if not low <= value <= high:
                raise KnnSsdError(f"the seed {name} {value} is outside the searched range {low}..{high}",
                                  fix=f"choose a value in {low}..{high}")
        for name, value, grid in (("suffix-tree min_path_prob", self.seed_tree.min_path_prob, PATH_PROBS),
                                  ("suffix-tree max_occurrences", self.seed_tree.max_occurrences, OCCURRENCES),
                                  ("suffix-tree spec_factor", self.seed_tree.spec_factor, SPEC_FACTORS),
                                  ("suffix-tree spec_offset", self.seed_tree.spec_offset, SPEC_OFFSETS),
                                  ("suffix-tree recycled_nodes", self.seed_tree.recycled_nodes, RECYCLED_NODES),
                                  ("suffix-tree recycled_k", self.seed_tree.recycled_k, RECYCLED_K)):
            if value not in grid:
                raise KnnSsdError(f"the seed {name} {value} is not on the search grid",
                                  fix=f"choose one of {', '.join(map(str, grid))}")

    def fingerprint(self) -> str:
        """What makes trials comparable: measurement settings and method (not the budget, the confirmation or
        the workers)."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("trials", "confirm_candidates", "confirm_prompts", "confirm_rounds", "workers", "min_speedup",
                             "kind_share")}
        keys["measurement"] = MEASUREMENT_VERSION
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]


def seed_skip_sets(num_layers: int, config: SearchConfig) -> list[SkipSet]:
    """Attention of the top 1, 2, 4 and 8 layers below the last (published skip sets skip attention more often
    than MLP, mostly in upper layers), within the skip-ratio bounds. Random starts over 2L coin flips skip
    about half of all sub-layers, which few models survive."""
    seeds = []
    for k in (1, 2, 4, 8):
        if k < num_layers:
            skip = SkipSet.of(attn=range(num_layers - 1 - k, num_layers - 1))
            if config.min_skip_ratio <= skip.skip_ratio(num_layers) <= config.max_skip_ratio:
                seeds.append(skip)
    return seeds


def skip_params(skip: SkipSet, num_layers: int) -> dict[str, Any]:
    params: dict[str, Any] = {f"attn_{i}": i in skip.attn for i in range(num_layers)}
    params.update({f"mlp_{i}": i in skip.mlp for i in range(num_layers)})
    return params


def tree_params(tree: SuffixTreeConfig, has_store: bool) -> dict[str, Any]:
    """A suffix-tree config as trial parameters; use_store only where the study has a store to draft from."""
    params: dict[str, Any] = {"suffix_tree.max_ngram": tree.max_ngram, "suffix_tree.min_ngram": tree.min_ngram,
                              "suffix_tree.max_occurrences": tree.max_occurrences,
                              "suffix_tree.max_depth": tree.max_depth,
                              "suffix_tree.max_tree_nodes": tree.max_tree_nodes,
                              "suffix_tree.min_path_prob": tree.min_path_prob,
                              "suffix_tree.spec_factor": tree.spec_factor, "suffix_tree.spec_offset": tree.spec_offset,
                              "suffix_tree.recycled_nodes": tree.recycled_nodes,
                              "suffix_tree.recycled_k": tree.recycled_k}
    if has_store:
        params["suffix_tree.use_store"] = True
    return params


def seed_trials(num_layers: int, config: SearchConfig, has_store: bool = False) -> list[dict[str, Any]]:
    """First trials of a new study, one per kind before the rest: prompt lookup with the configured n-gram
    size and draft length, then the layer-skip seed sets, then a hybrid of the two, then the seed suffix tree
    (drafting from the store where the study has one), as far as `kinds` allow."""
    lookup = {"prompt_lookup.max_ngram": config.seed_lookup.max_ngram,
              "prompt_lookup.min_ngram": config.seed_lookup.min_ngram,
              "prompt_lookup.max_draft_tokens": config.seed_lookup.max_draft_tokens}
    layer = {"layer_skip.threshold": config.seed_layer_skip.threshold,
             "layer_skip.max_draft_tokens": config.seed_layer_skip.max_draft_tokens}
    skips = seed_skip_sets(num_layers, config)
    seeds: list[dict[str, Any]] = []
    if "prompt_lookup" in config.kinds:
        seeds.append({"kind": "prompt_lookup", **lookup})
    if "layer_skip" in config.kinds:
        seeds.extend({"kind": "layer_skip", **layer, **skip_params(skip, num_layers)} for skip in skips)
    if "hybrid" in config.kinds and skips:
        seeds.append({"kind": "hybrid", **lookup, **layer, **skip_params(skips[0], num_layers)})
    if "suffix_tree" in config.kinds:
        seeds.append({"kind": "suffix_tree", **tree_params(config.seed_tree, has_store)})
    return seeds


def kind_quota(num_layers: int, config: SearchConfig, has_store: bool = False) -> list[dict[str, Any]]:
    """After the seeds, trials with only their kind fixed (the sampler picks the rest), round-robin over the
    kinds, until each kind has `kind_share` of the budget: TPE otherwise learns early that one kind scores best
    and spends nearly every trial on it (88 of 100 on prompt lookup in BENCHMARKS.md section 13), leaving the
    others barely searched."""
    seeds = seed_trials(num_layers, config, has_store)
    wanted = {kind: max(0, math.ceil(config.kind_share * config.trials)
                        - sum(seed["kind"] == kind for seed in seeds)) for kind in config.kinds}
    quota = []
    while any(wanted.values()):
        for kind in config.kinds:
            if wanted[kind]:
                quota.append({"kind": kind})
                wanted[kind] -= 1
    return quota


def suggest_skip_set(trial: optuna.Trial, num_layers: int) -> SkipSet:
    attn = [i for i in range(num_layers) if trial.suggest_categorical(f"attn_{i}", [False, True])]
    mlp = [i for i in range(num_layers) if trial.suggest_categorical(f"mlp_{i}", [False, True])]
    return SkipSet.of(attn=attn, mlp=mlp)


def suggest_tree(trial: optuna.Trial, has_store: bool, has_warm: bool = False,
                 has_union: bool = False) -> dict[str, Any]:
    """A suffix-tree policy's fields. use_store is a parameter only in a study with a store (a study without one
    never suggests it, so its policies never need one), use_warm only in a study whose store has successors and
    in a trial with recycled_nodes > 0, store_scope only in a study whose store carries a union of more than its
    own data and in a trial with use_store (conditional, as TPE handles; elsewhere "own": the mix study's store
    is the union itself); min_ngram is capped by max_ngram as for lookup."""
    max_ngram = trial.suggest_int("suffix_tree.max_ngram", *NGRAM_RANGE)
    recycled = trial.suggest_categorical("suffix_tree.recycled_nodes", list(RECYCLED_NODES))
    warm = bool(has_warm and recycled > 0 and trial.suggest_categorical("suffix_tree.use_warm", [False, True]))
    store = bool(has_store and trial.suggest_categorical("suffix_tree.use_store", [False, True]))
    scope = (trial.suggest_categorical("suffix_tree.store_scope", list(STORE_SCOPES)) if store and has_union
             else SuffixTreeConfig.store_scope)
    return {"max_ngram": max_ngram,
            "min_ngram": min(max_ngram, trial.suggest_int("suffix_tree.min_ngram", *MIN_NGRAM_RANGE)),
            "max_occurrences": trial.suggest_categorical("suffix_tree.max_occurrences", list(OCCURRENCES)),
            "max_depth": trial.suggest_int("suffix_tree.max_depth", *TREE_DEPTH_RANGE),
            "max_tree_nodes": trial.suggest_int("suffix_tree.max_tree_nodes", *TREE_NODES_RANGE),
            "min_path_prob": trial.suggest_categorical("suffix_tree.min_path_prob", list(PATH_PROBS)),
            "spec_factor": trial.suggest_categorical("suffix_tree.spec_factor", list(SPEC_FACTORS)),
            "spec_offset": trial.suggest_categorical("suffix_tree.spec_offset", list(SPEC_OFFSETS)),
            "recycled_nodes": recycled,
            "recycled_k": trial.suggest_categorical("suffix_tree.recycled_k", list(RECYCLED_K)),
            "use_store": store,
            "use_warm": warm,
            "store_scope": scope}


def suggest_policy(trial: optuna.Trial, num_layers: int, config: SearchConfig,
                   has_store: bool = False, has_warm: bool = False, has_union: bool = False) -> dict[str, Any]:
    """A draft policy (bundle JSON form) from the trial's parameters; `has_store`: the study's domain has a
    store that suffix-tree policies may draft from; `has_warm`: that store has successors, a warm table that
    recycling suffix-tree policies may start from; `has_union`: that store carries a union of more than its own
    data (`DomainStore.has_union`) that store-drafting suffix-tree policies may draft from instead or as well."""
    kind = trial.suggest_categorical("kind", list(config.kinds))
    if kind == "suffix_tree":
        return {"kind": kind, **suggest_tree(trial, has_store, has_warm, has_union)}
    parts: dict[str, dict[str, Any]] = {}
    if kind in ("prompt_lookup", "hybrid"):
        max_ngram = trial.suggest_int("prompt_lookup.max_ngram", *NGRAM_RANGE)
        parts["prompt_lookup"] = {
            "max_ngram": max_ngram,
            "min_ngram": min(max_ngram, trial.suggest_int("prompt_lookup.min_ngram", *MIN_NGRAM_RANGE)),
            "max_draft_tokens": trial.suggest_int("prompt_lookup.max_draft_tokens", *LOOKUP_DRAFT_RANGE)}
    if kind in ("layer_skip", "hybrid"):
        parts["layer_skip"] = {
            "skip_set": suggest_skip_set(trial, num_layers).to_dict(),
            "threshold": trial.suggest_categorical("layer_skip.threshold", list(THRESHOLDS)),
            "max_draft_tokens": trial.suggest_int("layer_skip.max_draft_tokens", *LAYER_SKIP_DRAFT_RANGE)}
    if kind == "hybrid":
        return {"kind": kind, **parts}
    return {"kind": kind, **parts[kind]}


def policy_skip_ratio(policy: dict[str, Any], num_layers: int) -> float | None:
    """The skip ratio of a policy's layer-skip part, None when it has none."""
    layer = policy if policy["kind"] == "layer_skip" else policy.get("layer_skip")
    return SkipSet.from_dict(layer["skip_set"]).skip_ratio(num_layers) if layer else None
