"""Reduce stage: cluster calibration embeddings into anchors and assemble the routing bundle.

Anchors: spherical k-means per domain with FAISS (k per domain, fewer when a domain has fewer prompts; with
k >= prompts every prompt is its own anchor). Fallback: a prompt whose nearest-anchor cosine distance exceeds
`margin` times the `quantile` of the calibration prompts' own leave-one-out nearest-anchor distances is routed
to a conservative policy: only the sub-layers that every domain's policy skips, with a higher confidence
threshold, or plain decoding when the domains share none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from knnssd.bundle import BundleSpec, normalise
from knnssd.engine.drafters import PromptLookupConfig
from knnssd.errors import KnnSsdError
from knnssd.engine.policy import layer_skip_parts, lookup_config


@dataclass(frozen=True)
class ReduceConfig:
    anchors_per_domain: int = 10
    kmeans_iterations: int = 25
    seed: int = 0
    fallback_quantile: float = 0.99
    fallback_margin: float = 1.5
    fallback_threshold: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.anchors_per_domain, bool) or not isinstance(self.anchors_per_domain, int) \
                or self.anchors_per_domain < 1:
            raise KnnSsdError(f"anchors per domain must be an integer >= 1, got {self.anchors_per_domain!r}",
                              fix="use e.g. --anchors-per-domain 10 (the paper's k)")
        if self.kmeans_iterations < 1 or not 0.0 < self.fallback_quantile <= 1.0 or self.fallback_margin <= 0:
            raise KnnSsdError("need kmeans_iterations >= 1, 0 < fallback_quantile <= 1 and fallback_margin > 0",
                              fix="use the defaults 25, 0.99 and 1.5")


def domain_anchors(embeddings: np.ndarray, k: int, config: ReduceConfig) -> np.ndarray:
    """(min(k, n), dim) unit-norm anchors for one domain's (n, dim) embeddings."""
    import faiss

    vectors = normalise(embeddings)
    if k >= vectors.shape[0]:
        return vectors
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=config.kmeans_iterations, seed=config.seed, spherical=True,
                          verbose=False)
    kmeans.train(vectors)
    return normalise(kmeans.centroids)


def build_anchors(embeddings: np.ndarray, labels: Sequence[str], domains: Sequence[str],
                  config: ReduceConfig) -> tuple[np.ndarray, tuple[int, ...]]:
    """All domains' anchors stacked (m, dim) and the domain index of each."""
    labels = np.asarray(labels)
    blocks, owners = [], []
    for index, domain in enumerate(domains):
        rows = embeddings[labels == domain]
        if rows.shape[0] == 0:
            raise ValueError(f"domain {domain!r} has no embeddings")
        anchors = domain_anchors(rows, config.anchors_per_domain, config)
        blocks.append(anchors)
        owners.extend([index] * anchors.shape[0])
    return np.concatenate(blocks), tuple(owners)


def fallback_distance(embeddings: np.ndarray, labels: Sequence[str], domains: Sequence[str],
                      config: ReduceConfig) -> float:
    """The distance beyond which a prompt is 'far from every anchor' (see module docstring).

    Leave-one-out: each calibration prompt's distance to the nearest *other* calibration prompt stands in for
    its distance to an anchor it did not shape, so a domain whose every prompt is an anchor is not given 0."""
    vectors = normalise(embeddings)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = 1.0 - similarity.max(axis=1)
    return float(min(2.0, np.quantile(nearest, config.fallback_quantile) * config.fallback_margin))


def conservative_policy(policies: dict[str, dict[str, Any]], config: ReduceConfig) -> dict[str, Any]:
    """The policy for prompts far from every anchor, which no domain's search measured.

    Every domain layer-skipping: skip only what all of them skip, drafting more cautiously. Every domain using
    prompt lookup (alone or in a hybrid): lookup alone, needing the longest matches any of them needs and
    drafting the fewest tokens any of them drafts (lookup costs no forward pass, so a miss costs nothing).
    Anything else, or nothing in common: plain decoding."""
    kinds = {p.get("kind") for p in policies.values()}
    if kinds == {"layer_skip"}:
        parts = [layer_skip_parts(p) for p in policies.values()]
        attn = sorted(set.intersection(*(set(skip.attn) for skip, _ in parts)))
        mlp = sorted(set.intersection(*(set(skip.mlp) for skip, _ in parts)))
        if not attn and not mlp:
            return {"kind": "none"}
        first = parts[0][1]
        return {"kind": "layer_skip", "skip_set": {"attn": attn, "mlp": mlp},
                **replace(first, threshold=max(first.threshold, config.fallback_threshold)).to_dict()}
    if kinds and kinds <= {"prompt_lookup", "hybrid"}:
        lookups = [lookup_config(p if p["kind"] == "prompt_lookup" else p["prompt_lookup"]) for p in policies.values()]
        max_ngram = max(c.max_ngram for c in lookups)
        return {"kind": "prompt_lookup", **PromptLookupConfig(
            max_ngram=max_ngram, min_ngram=min(max_ngram, max(c.min_ngram for c in lookups)),
            max_draft_tokens=min(c.max_draft_tokens for c in lookups)).to_dict()}
    return {"kind": "none"}


def build_bundle_spec(
    model_id: str,
    model_hash: str,
    embeddings: np.ndarray,
    labels: Sequence[str],
    policies: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, float]],
    config: ReduceConfig = ReduceConfig(),
    prompt_format: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    reference_policies: dict[str, dict[str, Any]] | None = None,
    stores: dict[str, np.ndarray] | None = None,
    successors: dict[str, np.ndarray] | None = None,
) -> BundleSpec:
    """Everything the bundle needs, from (n, dim) calibration embeddings with their domain labels; `stores`:
    {domain: (n,) int32 joined store} (`knnssd.bundle.join_store`), and `successors`: {domain: (vocab, k) int32
    warm successor table} (`pipeline.stores.DomainStore.table`), written into the bundle as they are."""
    domains = tuple(policies)
    anchors, owners = build_anchors(embeddings, labels, domains, config)
    return BundleSpec(
        model_id=model_id, model_hash=model_hash, domains=domains, anchors=anchors, anchor_domains=owners,
        policies=policies, fallback_policy=conservative_policy(policies, config),
        fallback_distance=fallback_distance(embeddings, labels, domains, config), metrics=metrics,
        prompt_format=prompt_format or {"chat": True}, reference_policies=reference_policies or {},
        stores=stores or {}, successors=successors or {},
        calibration={**(calibration or {}), "anchors_per_domain": config.anchors_per_domain,
                     "fallback_quantile": config.fallback_quantile, "fallback_margin": config.fallback_margin},
    )
