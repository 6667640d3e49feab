"""KNN routing: the nearest anchor (cosine) picks a prompt's domain.

distance = 1 - cosine similarity between the prompt embedding and its nearest anchor, in [0, 2].
A prompt whose distance exceeds the bundle's `fallback_distance` is routed to the fallback policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from knnssd.errors import KnnSsdError


@dataclass(frozen=True)
class Route:
    """Where one prompt went: `domain` of the nearest anchor, its cosine `distance`, and whether the
    prompt was too far from every anchor (`fallback`: the fallback policy is used)."""

    domain: str
    distance: float
    fallback: bool
    anchor: int


@dataclass(frozen=True)
class Router:
    """Nearest-anchor search over a FAISS inner-product index of unit-norm anchors."""

    index: Any
    anchor_domains: tuple[int, ...]
    domains: tuple[str, ...]
    fallback_distance: float

    def __post_init__(self) -> None:
        if self.index.ntotal < 1 or self.index.ntotal != len(self.anchor_domains):
            raise KnnSsdError(f"the router needs one domain label per anchor and at least one anchor; it has "
                              f"{self.index.ntotal} anchors and {len(self.anchor_domains)} labels",
                              fix="rebuild the bundle (bundles with no anchors are refused when read)")

    def route(self, embedding: torch.Tensor) -> Route:
        """Route one prompt embedding (hidden,), any dtype or device."""
        vector = embedding.detach().float().cpu().numpy().reshape(1, -1)
        if vector.shape[1] != self.index.d:
            raise KnnSsdError(f"the prompt embedding has {vector.shape[1]} dimensions but the bundle's anchors "
                              f"have {self.index.d}",
                              fix="use the model the bundle was calibrated on, or recalibrate for this model")
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        similarity, anchor = self.index.search(np.ascontiguousarray(vector, dtype=np.float32), 1)
        distance = 1.0 - float(similarity[0, 0])
        nearest = int(anchor[0, 0])
        return Route(domain=self.domains[self.anchor_domains[nearest]], distance=distance,
                     fallback=distance > self.fallback_distance, anchor=nearest)
