"""Drafters: what proposes tokens for the decoding loop to verify.

A drafter is a frozen value (its configuration). `start()` gives a fresh
`DraftSession` per generation, which holds whatever adapts during it (the
adaptive confidence threshold), so one drafter serves many generations and
threads. The loop calls `session.propose(request)` before each verification and
`session.observe(drafted, accepted)` after it.

Plain decoding is the loop with no drafter at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.errors import KnnSsdError
from knnssd.kvcache import rollback
from knnssd.layerskip import skip_sublayers
from knnssd.sampling import SamplingConfig, sample, warp_probs
from knnssd.skipset import SkipSet


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter may use to propose tokens.

    The cache holds exactly `position` committed tokens; `last_token` (1, 1) is the
    newest committed token, at position `position`, not yet in the cache. A drafter
    may extend the cache while drafting but must leave it at `position` tokens.
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
    dropped, for layer skipping)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    forwards: int = 0


class DraftSession(Protocol):
    def propose(self, request: DraftRequest) -> Draft: ...

    def observe(self, drafted: int, accepted: int) -> None: ...


class Drafter(Protocol):
    """Anything with `start()` returning a `DraftSession`, and a `describe()` for reports."""

    def start(self) -> DraftSession: ...

    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class DraftConfig:
    """Drafting parameters shared by confidence-gated drafters.

    Drafting stops at a token whose draft top-1 probability is below
    `threshold`, or after `max_draft_tokens`. With `keep_unconfident` (default) that
    last token is still proposed: its forward pass is already paid and verifying one
    more token costs little, so dropping it wastes a draft step whenever the very
    first token is unconfident. The paper's code drops it (`keep_unconfident=False`). With `adaptive`, the threshold moves
    by `adapt_step` after each verification, as in Draft&Verify: down when every
    draft was accepted (draft longer), up otherwise, kept within
    [`min_threshold`, `max_threshold`].
    """

    threshold: float = 0.8
    max_draft_tokens: int = 12
    keep_unconfident: bool = True
    adaptive: bool = False
    adapt_step: float = 0.05
    min_threshold: float = 0.3
    max_threshold: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise KnnSsdError(f"draft threshold must be in [0, 1], got {self.threshold}", fix="the paper uses 0.8")
        if self.max_draft_tokens < 1:
            raise KnnSsdError(
                f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}",
                fix="the paper drafts at most 12 tokens; use no drafter for plain decoding",
            )
        if not 0.0 <= self.min_threshold <= self.max_threshold <= 1.0:
            raise KnnSsdError(
                f"need 0 <= min_threshold <= max_threshold <= 1, got {self.min_threshold}, {self.max_threshold}",
                fix="use the defaults 0.3 and 0.95",
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "max_draft_tokens": self.max_draft_tokens,
            "keep_unconfident": self.keep_unconfident,
            "adaptive": self.adaptive,
            "adapt_step": self.adapt_step,
            "min_threshold": self.min_threshold,
            "max_threshold": self.max_threshold,
        }


def check_attention(model: PreTrainedModel, skip_set: SkipSet) -> None:
    """Skipped attention leaves cache layers of different lengths while drafting; 1-token SDPA steps need no
    mask and cope, but eager attention builds a mask sized by layer 0 and fails on the other layers."""
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if skip_set.attn and implementation != "sdpa":
        raise KnnSsdError(
            f"skipping attention sub-layers needs SDPA attention, but this model uses {implementation!r}",
            fix="load it with knnssd.load_model(), or from_pretrained(..., attn_implementation='sdpa')",
        )


@dataclass(frozen=True)
class LayerSkipDrafter:
    """Self-speculative drafter: the target model with `skip_set` sub-layers skipped.

    Example:
        >>> drafter = LayerSkipDrafter(SkipSet.of(attn=[20, 21, 22], mlp=[26]))
        >>> result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=64), drafter)
    """

    skip_set: SkipSet
    config: DraftConfig = DraftConfig()

    def start(self) -> "LayerSkipSession":
        return LayerSkipSession(self, self.config.threshold)

    def describe(self) -> dict[str, object]:
        return {"kind": "layer_skip", "skip_set": self.skip_set.to_dict(), **self.config.to_dict()}


class LayerSkipSession:
    """One generation's drafting state for a `LayerSkipDrafter`."""

    def __init__(self, drafter: LayerSkipDrafter, threshold: float) -> None:
        self.drafter = drafter
        self.threshold = threshold

    def propose(self, request: DraftRequest) -> Draft:
        """Chain 1-token forwards of the skipping model from `last_token`.

        Each step feeds the previous token at an explicit position (layer 0 may
        be skipped, so the cache's own length cannot be trusted for positions);
        1-token queries need no attention mask, so ragged cache layers are fine.
        """
        model, sampling = request.model, request.sampling
        check_attention(model, self.drafter.skip_set)
        limit = min(self.drafter.config.max_draft_tokens, request.max_tokens)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        token = request.last_token
        device = token.device
        forwards = 0
        try:
            with skip_sublayers(model, self.drafter.skip_set):
                for step in range(limit):
                    position_ids = torch.tensor([[request.position + step]], device=device)
                    out = model(input_ids=token, position_ids=position_ids, cache=request.cache,
                                use_cache=True, logits_to_keep=1)
                    forwards += 1
                    logits = out.logits[0, -1]  # (vocab,)
                    if sampling.greedy:
                        confidence, choice = logits.float().softmax(dim=-1).max(dim=-1)
                    else:
                        q = warp_probs(logits, sampling)  # (vocab,)
                        choice = sample(q, request.generator)
                        confidence = q.max()
                    confident = float(confidence) >= self.threshold
                    if not confident and not self.drafter.config.keep_unconfident:
                        break
                    tokens.append(choice.reshape(1))
                    if not sampling.greedy:
                        probs.append(q)
                    if not confident:
                        break
                    token = choice.reshape(1, 1)
        finally:
            rollback(request.cache, request.position)
        drafted = torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device)
        return Draft(tokens=drafted, probs=torch.stack(probs) if probs else None, forwards=forwards)

    def observe(self, drafted: int, accepted: int) -> None:
        config = self.drafter.config
        if not config.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.threshold = max(config.min_threshold, self.threshold - config.adapt_step)
        else:
            self.threshold = min(config.max_threshold, self.threshold + config.adapt_step)
