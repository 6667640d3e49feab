"""Per-domain stores of the model's own outputs: draft knowledge for suffix-tree policies.

A domain's store is the model's greedy continuation of each of the domain's calibration prompts. A suffix-tree
policy with `use_store` drafts from it as well as from the text (`knnssd.drafters.suffix_tree`). A trial that
measures calibration prompt p drafts from the store without p's own output (`DomainStore.arrays(exclude=p)`),
else it would look its own future up; held-out prompts and the bundle use the whole store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class DomainStore:
    """domain: its name; prompts: the calibration prompt texts, in order; outputs: the model's greedy
    continuation (new token ids) of each, in the same order."""

    domain: str
    prompts: tuple[str, ...]
    outputs: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.outputs):
            raise ValueError(f"store {self.domain}: {len(self.prompts)} prompts but {len(self.outputs)} outputs")

    def arrays(self, exclude: str | None = None) -> list[tuple[int, ...]]:
        """The token arrays to draft from, without the outputs of prompt text `exclude` (if it is one)."""
        return [output for prompt, output in zip(self.prompts, self.outputs) if prompt != exclude]

    @property
    def tokens(self) -> int:
        return sum(len(output) for output in self.outputs)

    @classmethod
    def union(cls, stores: Iterable["DomainStore"], domain: str) -> "DomainStore":
        """One store of every store's outputs (the Self-SD(Mix) reference drafts from it)."""
        stores = list(stores)
        return cls(domain=domain, prompts=tuple(p for s in stores for p in s.prompts),
                   outputs=tuple(o for s in stores for o in s.outputs))
