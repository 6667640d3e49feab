"""Prompt-lookup drafting: propose what followed the last n-gram where it occurred before.

Prompt lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``) drafts without any model: the last
n tokens of prompt + generated text are looked up among earlier positions, and the tokens that followed the
match are proposed. It pays where the output copies its input (translation, summarisation, extraction, RAG,
code edits) and costs nothing where nothing matches, apart from the verify pass then being a plain step.

Unlike transformers, which rescans the whole sequence every step, a session keeps an index of every n-gram
(n in [min_ngram, max_ngram]) to the position it last ended at, updated only with the tokens committed since
the previous call: the per-step cost does not grow with the sequence. The most recent occurrence is used
(transformers takes the earliest); the longest n with a match wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from knnssd.engine.drafters.base import Draft, DraftRequest
from knnssd.engine.checks import require_int
from knnssd.errors import KnnSsdError


@dataclass(frozen=True)
class PromptLookupConfig:
    """max_ngram / min_ngram: the n-gram sizes tried, longest first; max_draft_tokens: tokens proposed at most."""

    max_ngram: int = 3
    min_ngram: int = 1
    max_draft_tokens: int = 10

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "max_draft_tokens"):
            require_int(getattr(self, name), name, "3")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise KnnSsdError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, max_ngram={self.max_ngram}",
                fix="transformers' prompt lookup uses n-grams of 1 to 2 tokens; 1 to 3 is the default here",
            )
        if self.max_draft_tokens < 1:
            raise KnnSsdError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}",
                              fix="transformers' default is 10 (prompt_lookup_num_tokens)")

    def to_dict(self) -> dict[str, object]:
        """The fields as the policy JSON names them."""
        return asdict(self)


class NgramIndex:
    """n-gram -> last position it ended at, over a growing token list whose continuation is known.

    An n-gram ending at position i is indexed once token i + 1 exists, so a hit always has a continuation
    and the sequence's own suffix never matches itself.
    """

    def __init__(self, config: PromptLookupConfig) -> None:
        self.config = config
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # positions [0, indexed) have had their n-grams indexed

    def update(self, history: list[int]) -> None:
        """Index the n-grams ending at positions `indexed` .. len(history) - 2."""
        low, high = self.config.min_ngram, self.config.max_ngram
        for end in range(self.indexed, len(history) - 1):
            for n in range(low, min(high, end + 1) + 1):
                self.ends[tuple(history[end - n + 1:end + 1])] = end
        self.indexed = max(self.indexed, len(history) - 1)

    def continuation(self, history: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest matching suffix of `history`, or []."""
        for n in range(min(self.config.max_ngram, len(history)), self.config.min_ngram - 1, -1):
            end = self.ends.get(tuple(history[-n:]))
            if end is not None:
                return history[end + 1:end + 1 + limit]
        return []


@dataclass(frozen=True)
class PromptLookupDrafter:
    """Drafts by n-gram lookup in prompt + generated text; no draft model, no forward pass.

    Example:
        >>> result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=64),
        ...                   PromptLookupDrafter(PromptLookupConfig(max_ngram=3, max_draft_tokens=10)))
    """

    config: PromptLookupConfig = PromptLookupConfig()

    def start(self) -> "PromptLookupSession":
        return PromptLookupSession(self.config)

    def describe(self) -> dict[str, object]:
        return {"kind": "prompt_lookup", **self.config.to_dict()}


class PromptLookupSession:
    """One generation's n-gram index."""

    def __init__(self, config: PromptLookupConfig) -> None:
        self.config = config
        self.index = NgramIndex(config)

    def propose(self, request: DraftRequest) -> Draft:
        history = request.history
        self.index.update(history)
        limit = min(self.config.max_draft_tokens, request.max_tokens)
        tokens = self.index.continuation(history, limit)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long, device=request.last_token.device), probs=None)

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing adapts."""
