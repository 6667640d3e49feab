"""Hybrid drafting: prompt lookup where the text repeats, layer skipping elsewhere.

Each step first asks the lookup index; when the last n-gram has an earlier occurrence its continuation is the
draft (free), otherwise the layer-skip drafter drafts (a few cheap forwards). Each draft comes wholly from one
source, so verification needs nothing new: lookup drafts are point masses, layer-skip drafts carry their q.
"""

from __future__ import annotations

from dataclasses import dataclass

from knnssd.engine.drafters.base import Draft, DraftRequest
from knnssd.engine.drafters.layer_skip import LayerSkipDrafter, LayerSkipSession
from knnssd.engine.drafters.prompt_lookup import PromptLookupDrafter, PromptLookupSession


@dataclass(frozen=True)
class HybridDrafter:
    """Prompt lookup first, layer skipping when lookup has nothing to propose.

    Example:
        >>> HybridDrafter(PromptLookupDrafter(), LayerSkipDrafter(SkipSet.of(attn=[25])))
    """

    lookup: PromptLookupDrafter
    layer_skip: LayerSkipDrafter

    def start(self) -> "HybridSession":
        return HybridSession(self.lookup.start(), self.layer_skip.start())

    def describe(self) -> dict[str, object]:
        lookup = {k: v for k, v in self.lookup.describe().items() if k != "kind"}
        layer_skip = {k: v for k, v in self.layer_skip.describe().items() if k != "kind"}
        return {"kind": "hybrid", "prompt_lookup": lookup, "layer_skip": layer_skip}


class HybridSession:
    """The two sessions, and which one drafted last (only that one learns from the verification)."""

    def __init__(self, lookup: PromptLookupSession, layer_skip: LayerSkipSession) -> None:
        self.lookup = lookup
        self.layer_skip = layer_skip
        self.last_from_lookup = False

    def propose(self, request: DraftRequest) -> Draft:
        draft = self.lookup.propose(request)
        self.last_from_lookup = draft.tokens.shape[0] > 0
        return draft if self.last_from_lookup else self.layer_skip.propose(request)

    def observe(self, drafted: int, accepted: int) -> None:
        if not self.last_from_lookup:
            self.layer_skip.observe(drafted, accepted)
