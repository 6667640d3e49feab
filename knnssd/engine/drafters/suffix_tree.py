"""Suffix-tree drafting: several continuations of the text's latest suffix, merged into one pruned token tree.

Prompt lookup (`prompt_lookup.py`) proposes what followed the latest occurrence of the text's last n tokens.
This drafter looks at up to `max_occurrences` occurrences of that n-gram (the longest n in [min_ngram,
max_ngram] that occurred before), in the prompt and the output so far and, when given, in a store of token
arrays (e.g. a domain's own earlier outputs), and merges what followed each into one trie, as SuffixDecoding
(Oliaro et al. 2024) does:

- each trie node counts the occurrences whose continuation passes through it; its estimated path probability
  is count(node) / occurrences, the product along its path of child count / parent count;
- the draft keeps the `max_tree_nodes` most probable nodes (shallower first among equals, then the most recent
  occurrence's) whose path probability is at least `min_path_prob`, to depth `max_depth`. An ancestor is never
  less probable than its descendants, so the kept nodes form a tree; listed in that order they are in
  topological order and each node's first child is its most probable one, so the tree's first path (what the
  loop verifies under sampling) is its best path.

With one occurrence the tree is prompt lookup's path. Costs per step: the index takes only the tokens committed
since the last call (like prompt lookup's), and the trie holds at most occurrences x depth nodes, so neither
grows with the text. The store is indexed once, when the drafter is made.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch

from knnssd.engine.checks import require_bool, require_int, require_number
from knnssd.engine.drafters.base import Draft, DraftRequest
from knnssd.errors import KnnSsdError

SEPARATOR = -1  # between the store's arrays: no n-gram spans it and no continuation crosses it


@dataclass(frozen=True)
class SuffixTreeConfig:
    """max_ngram / min_ngram: the suffix lengths matched, longest first; max_occurrences: the latest occurrences
    of the matched n-gram merged (per source); max_depth: the deepest node; max_tree_nodes: nodes kept;
    min_path_prob: the least estimated path probability a node may have."""

    max_ngram: int = 4
    min_ngram: int = 1
    max_occurrences: int = 16
    max_depth: int = 10
    max_tree_nodes: int = 15
    min_path_prob: float = 0.1
    use_store: bool = False

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "max_occurrences", "max_depth", "max_tree_nodes"):
            require_int(getattr(self, name), name, "4")
            if getattr(self, name) < 1:
                raise KnnSsdError(f"{name} must be >= 1, got {getattr(self, name)}",
                                  fix=f"the default is {getattr(SuffixTreeConfig, name)}")
        if self.min_ngram > self.max_ngram:
            raise KnnSsdError(f"need min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                              f"max_ngram={self.max_ngram}", fix="e.g. min_ngram 1, max_ngram 4 (the defaults)")
        require_bool(self.use_store, "use_store")
        require_number(self.min_path_prob, "min_path_prob", "0.1")
        if not 0 < self.min_path_prob <= 1:
            raise KnnSsdError(f"min_path_prob must lie in (0, 1], got {self.min_path_prob}",
                              fix="0.1 keeps nodes that at least one occurrence in ten continues through")

    def to_dict(self) -> dict[str, object]:
        """The fields as the policy JSON names them."""
        return asdict(self)


class OccurrenceIndex:
    """n-gram -> the latest `cap` positions it ended at (oldest first), over a growing token list.

    An n-gram ending at position i is indexed once token i + 1 exists and is not a SEPARATOR, so every hit has
    a continuation and the list's own suffix never matches itself. n-grams spanning a SEPARATOR are skipped.
    """

    def __init__(self, config: SuffixTreeConfig) -> None:
        self.config = config
        self.ends: dict[tuple[int, ...], deque[int]] = {}
        self.indexed = 0  # positions [0, indexed) have had their n-grams indexed

    def update(self, tokens: Sequence[int]) -> None:
        """Index the n-grams ending at positions `indexed` .. len(tokens) - 2."""
        low, high, cap = self.config.min_ngram, self.config.max_ngram, self.config.max_occurrences
        for end in range(self.indexed, len(tokens) - 1):
            if tokens[end + 1] == SEPARATOR:
                continue
            for n in range(low, min(high, end + 1) + 1):
                gram = tuple(tokens[end - n + 1:end + 1])
                if gram[0] == SEPARATOR:  # the separator, if any, is the gram's first token at the widest n
                    break
                self.ends.setdefault(gram, deque(maxlen=cap)).append(end)
        self.indexed = max(self.indexed, len(tokens) - 1)


@dataclass(frozen=True, eq=False)
class SuffixStore:
    """Token arrays drafted from beside the text itself (e.g. a domain's own earlier outputs), indexed once.

    `tokens` is the arrays joined by SEPARATOR. Build it with `SuffixStore.of(arrays, config)`.
    """

    tokens: tuple[int, ...]
    index: OccurrenceIndex = field(repr=False)
    arrays: int = 0

    @classmethod
    def of(cls, arrays: Iterable[Sequence[int] | torch.Tensor], config: SuffixTreeConfig) -> "SuffixStore":
        joined: list[int] = []
        count = 0
        for number, array in enumerate(arrays):
            values = array.tolist() if hasattr(array, "tolist") else list(array)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise KnnSsdError(f"store array {number} holds something other than token ids (ints >= 0)",
                                  fix="give the store as sequences of token ids, e.g. outputs' token_ids")
            joined.extend(values + [SEPARATOR])
            count += 1
        index = OccurrenceIndex(config)
        index.update(joined)
        return cls(tokens=tuple(joined), index=index, arrays=count)


@dataclass(frozen=True)
class SuffixTreeDrafter:
    """Drafts a token tree of the continuations of the text's latest suffix; no draft model, no forward pass.

    Example:
        >>> drafter = SuffixTreeDrafter(SuffixTreeConfig(max_tree_nodes=15, min_path_prob=0.1))
        >>> result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=64), drafter)
        >>> result.stats.mean_accepted_tokens, result.stats.mean_verify_width
        >>> with_store = SuffixTreeDrafter.with_store([earlier.token_ids for earlier in results])
    """

    config: SuffixTreeConfig = SuffixTreeConfig()
    store: SuffixStore | None = None

    @classmethod
    def with_store(cls, arrays: Iterable[Sequence[int] | torch.Tensor],
                   config: SuffixTreeConfig = SuffixTreeConfig()) -> "SuffixTreeDrafter":
        """A drafter that also looks the suffix up in `arrays` (token id sequences), indexed now."""
        return cls(config, SuffixStore.of(arrays, config))

    def start(self) -> "SuffixTreeSession":
        return SuffixTreeSession(self.config, self.store)

    def describe(self) -> dict[str, object]:
        """The policy (the store is not part of it)."""
        return {"kind": "suffix_tree", **self.config.to_dict()}


class SuffixTreeSession:
    """One generation's index of the text, and the drafter's store."""

    def __init__(self, config: SuffixTreeConfig, store: SuffixStore | None) -> None:
        self.config = config
        self.store = store
        self.index = OccurrenceIndex(config)

    def occurrences(self, history: list[int]) -> list[tuple[Sequence[int], int]]:
        """(source tokens, end) of the latest occurrences of the longest suffix of `history` that occurred
        before, newest first, the text's before the store's; [] when none did."""
        sources = [(history, self.index)] + ([(self.store.tokens, self.store.index)] if self.store else [])
        for n in range(min(self.config.max_ngram, len(history)), self.config.min_ngram - 1, -1):
            gram = tuple(history[-n:])
            hits = [(tokens, end) for tokens, index in sources for end in reversed(index.ends.get(gram, ()))]
            if hits:
                return hits
        return []

    def propose(self, request: DraftRequest) -> Draft:
        self.index.update(request.history)
        depth_limit = min(self.config.max_depth, request.max_tokens)
        tokens, parents, counts, depths = [], [], [], []  # the trie, nodes in creation order
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        hits = self.occurrences(request.history)
        for source, end in hits:
            node = -1
            for token in source[end + 1:end + 1 + depth_limit]:
                if token == SEPARATOR:
                    break
                child = children.get((node, token))
                if child is None:
                    child = children[node, token] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    counts.append(0)
                    depths.append(depths[node] + 1 if node >= 0 else 1)
                counts[child] += 1
                node = child
        order = sorted(range(len(tokens)), key=lambda i: (-counts[i], depths[i], i))
        kept = [i for i in order if counts[i] / len(hits) >= self.config.min_path_prob][:self.config.max_tree_nodes]
        new_index = {old: new for new, old in enumerate(kept)}
        kept_parents = [new_index[parents[i]] if parents[i] >= 0 else -1 for i in kept]
        device = request.last_token.device
        is_path = all(parent == i - 1 for i, parent in enumerate(kept_parents))
        return Draft(tokens=torch.tensor([tokens[i] for i in kept], dtype=torch.long, device=device), probs=None,
                     parents=None if is_path else torch.tensor(kept_parents, dtype=torch.long, device=device))

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing adapts."""
