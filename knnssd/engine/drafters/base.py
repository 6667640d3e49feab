"""The drafter interface: what proposes tokens for the decoding loop to verify.

A drafter is a frozen value (its configuration). `start()` gives a fresh `DraftSession` per generation, which
holds whatever adapts during it (the adaptive confidence threshold, the n-gram index), so one drafter value
serves many generations. The loop calls `session.propose(request)` before each verification and
`session.observe(drafted, accepted)` after it; a session that also defines
`observe_logits(tokens, logits)` is handed the committed rows of each verify pass (see `DraftSession`).
Plain decoding is the loop with no drafter at all.

Each drafter kind has its own module beside this one: `layer_skip`, `prompt_lookup`, `hybrid`, `suffix_tree`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.sampling import SamplingConfig


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter may use to propose tokens.

    The cache holds exactly `position` committed tokens; `last_token` (1, 1) is the
    newest committed token, at position `position`, not yet in the cache. A drafter
    may extend the cache while drafting but must leave it at `position` tokens.
    `max_tokens` is the most tokens it may propose (the loop cuts longer drafts); for a token
    tree it is the deepest a node may lie (a tree commits at most its depth), and deeper
    nodes are cut.
    `history` is every committed token id, prompt first, ending with `last_token`
    (length `position + 1`); the loop appends to it in place, so a drafter that
    indexes it can read only what is new since its last call. Do not modify it.
    """

    model: PreTrainedModel
    cache: DynamicCache
    last_token: torch.Tensor
    position: int
    max_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    history: list[int]


@dataclass(frozen=True)
class Draft:
    """Proposed tokens: `tokens` (k,) int64; `probs` (k, vocab) their draft
    distributions q when sampling, None when greedy or when the tokens were chosen
    deterministically (prompt lookup: q is a point mass); `forwards` the draft-model
    forward passes spent (0 for lookup; k, or k + 1 when a low-confidence token was
    dropped, for layer skipping).

    `parents` None: the tokens are one path, token i following token i - 1. Otherwise a
    token tree: `parents` (k,) int64, the index of each node's parent node, -1 for a node
    that follows the last committed token directly; nodes in topological order
    (parents[i] < i). A tree is verified in one pass (`knnssd.engine.tree`) under greedy decoding;
    under sampling the loop keeps its first path (node 0, then each node's first child in
    node order), so a tree drafter lists its best child first. A tree's drafts are chosen
    deterministically: `probs` must be None.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None
    forwards: int = 0
    parents: torch.Tensor | None = None


class DraftSession(Protocol):
    """One generation's drafting state.

    Optional, and a no-op where a session does not define it: `observe_logits(tokens, logits)`, called by the
    loop in each verify pass (before `observe`) with the pass's committed rows only: `tokens` (n,) long, the
    last committed token then the accepted drafts, and `logits` (n, vocab), the target's raw logits after each
    (row i predicts what follows tokens[i]). Rows after a rejected draft are not passed: their logits condition
    on text that was never committed, which replay (`pipeline.replay`) cannot reproduce. What a session does
    with them may change its drafts, never the output.
    """

    def propose(self, request: DraftRequest) -> Draft: ...

    def observe(self, drafted: int, accepted: int) -> None: ...


class Drafter(Protocol):
    """Anything with `start()` returning a `DraftSession`, and a `describe()` for reports."""

    def start(self) -> DraftSession: ...

    def describe(self) -> dict[str, object]: ...
