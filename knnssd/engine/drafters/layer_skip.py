"""Layer-skip drafting: the target model itself, with some attention and MLP sub-layers skipped.

Drafting is greedy (or sampled), chained 1-token forwards of the skipping model, and stops at a token whose
top-1 probability is below the confidence threshold or after `max_draft_tokens` (as the paper's code does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from knnssd.engine.attention import BASE_IMPLEMENTATION, IMPLEMENTATION
from knnssd.engine.drafters.base import Draft, DraftRequest
from knnssd.engine.checks import require_bool, require_int, require_number
from knnssd.errors import KnnSsdError
from knnssd.engine.kvcache import rollback
from knnssd.engine.sampling import sample, warp_probs
from knnssd.engine.skipset import SkipSet
from knnssd.engine.sublayers import skip_sublayers


@dataclass(frozen=True)
class LayerSkipConfig:
    """Layer-skip drafting parameters (the defaults are the paper's: threshold 0.8, at most 12 tokens).

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
        for name in ("threshold", "adapt_step", "min_threshold", "max_threshold"):
            require_number(getattr(self, name), name, "0.8")
        require_int(self.max_draft_tokens, "max_draft_tokens", "12")
        require_bool(self.keep_unconfident, "keep_unconfident")
        require_bool(self.adaptive, "adaptive")
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
        """The fields as the policy JSON names them."""
        return asdict(self)

    def adapted_threshold(self, threshold: float, drafted: int, accepted: int) -> float:
        """The threshold after a verification of `drafted` tokens that accepted `accepted` (unchanged unless
        `adaptive`): lower when every draft was accepted, higher otherwise, within the bounds."""
        if not self.adaptive or drafted == 0:
            return threshold
        if accepted == drafted:
            return max(self.min_threshold, threshold - self.adapt_step)
        return min(self.max_threshold, threshold + self.adapt_step)


def confident_enough(confidence: float, threshold: float, config: LayerSkipConfig) -> tuple[bool, bool]:
    """The stop rule of one drafted token with top-1 probability `confidence`: (propose it, stop after it)."""
    confident = confidence >= threshold
    return confident or config.keep_unconfident, not confident


def check_attention(model: PreTrainedModel, skip_set: SkipSet) -> None:
    """Skipped attention leaves cache layers of different lengths while drafting; 1-token SDPA steps need no
    mask and cope (so does `knnssd.engine.attention`'s, which hands 1-token steps to SDPA), but eager attention builds a
    mask sized by layer 0 and fails on the other layers."""
    implementation = getattr(model.config, "_attn_implementation", BASE_IMPLEMENTATION)
    if skip_set.attn and implementation not in (BASE_IMPLEMENTATION, IMPLEMENTATION):
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
    config: LayerSkipConfig = LayerSkipConfig()

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
                    take, stop = confident_enough(float(confidence), self.threshold, self.drafter.config)
                    if take:
                        tokens.append(choice.reshape(1))
                        if not sampling.greedy:
                            probs.append(q)
                    if stop:
                        break
                    token = choice.reshape(1, 1)
        finally:
            rollback(request.cache, request.position)
        drafted = torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device)
        return Draft(tokens=drafted, probs=torch.stack(probs) if probs else None, forwards=forwards)

    def observe(self, drafted: int, accepted: int) -> None:
        self.threshold = self.drafter.config.adapted_threshold(self.threshold, drafted, accepted)
