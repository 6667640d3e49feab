"""The domain-shift study's settings (`EvalConfig`) and the names of its streams, peers and built-in methods
(`pipeline.study` runs it, `pipeline.methods` builds its methods)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from knnssd.errors import KnnSsdError

STREAMS = ("task", "mixed")
OOD_STREAM = "ood"
PEERS = ("hf-prompt-lookup", "hf-early-exit")
DEFAULT_PEERS = ("hf-prompt-lookup",)  # the early-exit assistant runs at about 0.2x here: opt-in
BUILT_IN_METHODS = ("plain", "mix", "knn", "oracle", "hf-plain", *PEERS)


@dataclass(frozen=True)
class EvalConfig:
    """max_new_tokens per generation; prompts_per_domain held-out prompts used per domain (None: all);
    fix_domains: whose policies run as Self-SD(Fix) (None: every domain's); peers: transformers' methods to
    time; lookup_tokens: their `prompt_lookup_num_tokens`; early_exit_layer: their `assistant_early_exit`
    (None: half the model's layers); policies: extra (name, draft policy) methods; allow_unverified_data:
    evaluate a bundle that records no data fingerprint (its held-out split cannot be checked) with a warning
    instead of refusing it (a bundle whose recorded fingerprint differs from the data is refused always)."""

    max_new_tokens: int = 64
    prompts_per_domain: int | None = None
    streams: tuple[str, ...] = STREAMS
    fix_domains: tuple[str, ...] | None = None
    peers: tuple[str, ...] = DEFAULT_PEERS
    lookup_tokens: int = 10
    early_exit_layer: int | None = None
    seed: int = 0
    policies: tuple[tuple[str, dict[str, Any]], ...] = ()
    ood_domains: tuple[str, ...] = ()
    allow_unverified_data: bool = False

    def __post_init__(self) -> None:
        for name, _ in self.policies:
            if name in BUILT_IN_METHODS or name.startswith("fix-") or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise KnnSsdError(f"extra policy name {name!r} is taken by a built-in method or has characters "
                                  "other than letters, digits, '_', '.', '-'",
                                  fix="name it otherwise, e.g. --policy lookup-only='{\"kind\": \"prompt_lookup\"}'")
        for name, given, known in (("stream", self.streams, STREAMS), ("peer", self.peers, PEERS)):
            unknown = [x for x in given if x not in known]
            if unknown:
                raise KnnSsdError(f"unknown {name} {', '.join(unknown)}", fix=f"choose from {', '.join(known)}")
        if not self.streams:
            raise KnnSsdError("no stream to run", fix="use --streams task, mixed or task,mixed")
        if self.max_new_tokens < 1 or (self.prompts_per_domain is not None and self.prompts_per_domain < 1):
            raise KnnSsdError("max_new_tokens and prompts_per_domain must be >= 1", fix="e.g. 64 and 5")
