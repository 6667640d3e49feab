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
grows with the text. The store is indexed once, when the drafter is made (`StoreIndex`: compact arrays whose
memory is bounded by the store's size, see there).

Two optional rules, both off by default (so a policy without them drafts as before):

- adaptive length (SuffixDecoding's rule): with `spec_factor` > 0, the matched suffix's nodes lie at most
  int(spec_factor * n + spec_offset) deep, n the length of the n-gram matched (at most max_ngram here, where
  SuffixDecoding matches suffixes up to its tree's depth); a short match drafts shallow, a long one deep;
- recycled successors (`recycled.py`, Token Recycling): with `recycled_nodes` > 0, up to that many more nodes
  from the model's own top-`recycled_k` successors of each token, learnt from this generation's verify passes
  (`observe_logits`) over an optional warm start. They grow from the root (the last committed token) and from
  every node kept above, best first by estimated path probability: a rank-r successor's is its parent's times
  RANK_PRIOR[r] (0.5, 0.25, ...; the matched nodes' as above, the root's 1). They are bounded by their node
  budget and max_depth only (not by min_path_prob or the adaptive cap, which judge matches); a candidate that
  is already a node is not added twice. The merged nodes are listed by (path probability, depth, order made),
  so the tree stays in topological order with each node's most probable child first; a draft then exists at
  every step once the last token has successors.

Store scope (`store_scope`, read with `use_store`): which store a policy drafts from beside the text. "own" (the
default): the drafter's `store` (a domain's own outputs); "union": its `union` (every domain's outputs, as the
Self-SD(Mix) reference drafts from); "both": each step builds one candidate tree from each (text + own store,
text + union, each matched, capped and pruned as above) and keeps the one with the larger expected accepted
tokens, the sum of its nodes' path probabilities (how ArcticInference's suffix decoding scores candidate trees),
the own store's winning ties. The choice depends only on the text and the two stores, so replay
(`pipeline.replay`) reproduces it exactly; the recycled successors then grow on the chosen tree.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from knnssd.engine.checks import require_bool, require_int, require_number
from knnssd.engine.drafters.base import Draft, DraftRequest
from knnssd.engine.drafters.recycled import MAX_SUCCESSORS, RANK_PRIOR, SuccessorTable, Successors, top_successors
from knnssd.errors import KnnSsdError

SEPARATOR = -1  # between the store's arrays: no n-gram spans it and no continuation crosses it
STORE_SCOPES = ("own", "union", "both")  # SuffixTreeConfig.store_scope: the store(s) a use_store policy drafts from
MAX_RANGES = 1 << 16  # n-gram ranges a StoreIndex keeps (see there)


@dataclass(frozen=True)
class SuffixTreeConfig:
    """max_ngram / min_ngram: the suffix lengths matched, longest first; max_occurrences: the latest occurrences
    of the matched n-gram merged (per source); max_depth: the deepest node; max_tree_nodes: nodes kept;
    min_path_prob: the least estimated path probability a node may have; use_store: also match in the drafter's
    store; spec_factor / spec_offset: the adaptive depth of a match of n tokens, int(spec_factor * n +
    spec_offset) (spec_factor 0: off); recycled_nodes: nodes from the recycled successors (0: off); recycled_k:
    successors per token kept (1..MAX_SUCCESSORS); use_warm: each generation's recycled successors start from
    the drafter's warm table (a domain's, from the bundle; needs recycled_nodes > 0); store_scope: with
    use_store, which store: "own" (the drafter's store), "union" (its union of every domain's store) or "both"
    (per step, the candidate tree of larger expected accepted tokens; see the module docstring)."""

    max_ngram: int = 4
    min_ngram: int = 1
    max_occurrences: int = 16
    max_depth: int = 10
    max_tree_nodes: int = 15
    min_path_prob: float = 0.1
    use_store: bool = False
    spec_factor: float = 0.0
    spec_offset: int = 0
    recycled_nodes: int = 0
    recycled_k: int = MAX_SUCCESSORS
    use_warm: bool = False
    store_scope: str = "own"

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "max_occurrences", "max_depth", "max_tree_nodes", "recycled_k"):
            require_int(getattr(self, name), name, "4")
            if getattr(self, name) < 1:
                raise KnnSsdError(f"{name} must be >= 1, got {getattr(self, name)}",
                                  fix=f"the default is {getattr(SuffixTreeConfig, name)}")
        if self.min_ngram > self.max_ngram:
            raise KnnSsdError(f"need min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                              f"max_ngram={self.max_ngram}", fix="e.g. min_ngram 1, max_ngram 4 (the defaults)")
        require_bool(self.use_store, "use_store")
        require_bool(self.use_warm, "use_warm")
        require_number(self.min_path_prob, "min_path_prob", "0.1")
        if not 0 < self.min_path_prob <= 1:
            raise KnnSsdError(f"min_path_prob must lie in (0, 1], got {self.min_path_prob}",
                              fix="0.1 keeps nodes that at least one occurrence in ten continues through")
        require_number(self.spec_factor, "spec_factor", "1.0")
        if not 0 <= self.spec_factor <= 64:
            raise KnnSsdError(f"spec_factor must lie in [0, 64], got {self.spec_factor}",
                              fix="0 turns the adaptive depth off; SuffixDecoding uses 1.0 to 4.0")
        require_int(self.spec_offset, "spec_offset", "0")
        require_int(self.recycled_nodes, "recycled_nodes", "8")
        if self.recycled_nodes < 0:
            raise KnnSsdError(f"recycled_nodes must be >= 0, got {self.recycled_nodes}",
                              fix="0 turns recycled successors off; e.g. 8 adds up to 8 nodes")
        if self.recycled_k > MAX_SUCCESSORS:
            raise KnnSsdError(f"recycled_k must be at most {MAX_SUCCESSORS}, got {self.recycled_k}",
                              fix=f"use 1..{MAX_SUCCESSORS} (the successors recorded per token)")
        if not isinstance(self.store_scope, str) or self.store_scope not in STORE_SCOPES:
            raise KnnSsdError(f"store_scope must be one of {', '.join(STORE_SCOPES)}, got {self.store_scope!r}",
                              fix='"own" drafts from the domain\'s store, "union" from every domain\'s, "both" from '
                                  'whichever of the two gives the larger expected tree at each step')
        if self.use_warm and self.recycled_nodes == 0:
            raise KnnSsdError("use_warm starts the recycled successors from a warm table, but recycled_nodes is 0",
                              fix='set "recycled_nodes" > 0 (e.g. 8), or "use_warm": false')

    def match_depth(self, matched: int) -> int | None:
        """The deepest a matched node may lie after a match of `matched` tokens; None when the adaptive rule is
        off."""
        return int(self.spec_factor * matched + self.spec_offset) if self.spec_factor > 0 else None

    def to_dict(self) -> dict[str, object]:
        """The fields as the policy JSON names them."""
        return asdict(self)


class OccurrenceIndex:
    """n-gram -> the latest `cap` positions it ended at (oldest first), over a growing token list (the text).

    An n-gram ending at position i is indexed once token i + 1 exists and is not a SEPARATOR, so every hit has
    a continuation and the list's own suffix never matches itself. n-grams spanning a SEPARATOR are skipped.
    A deque per distinct n-gram: right for one generation's text, too costly for a store (`StoreIndex`).
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

    def latest(self, gram: tuple[int, ...], cap: int) -> list[int]:
        """The latest min(cap, max_occurrences) end positions of `gram`, oldest first."""
        ends = self.ends.get(gram, ())
        return list(ends)[-cap:] if len(ends) > cap else list(ends)


class StoreIndex:
    """The `OccurrenceIndex` of a fixed token array, in compact arrays: for each n in [min_ngram, max_ngram] the
    end positions of every n-gram that has a continuation (as `OccurrenceIndex` counts them), int32, sorted by
    (n-gram, position); a lookup is two binary searches and keeps the last `cap` of the n-gram's range.

    Memory bound: 4 bytes per entry per n-gram size, 4 x entries x (max_ngram - min_ngram + 1) bytes, beside
    the store's own int32 tokens (4 x entries): at most 20 x entries bytes for n-grams 1-4, whatever the
    occurrence cap, where a deque per distinct n-gram (as `OccurrenceIndex`) costs several hundred bytes per
    distinct n-gram, GBs near 4M entries. Measured once with tracemalloc (2026-12-04, this 2-core machine) on a
    synthetic store at the bundle limit (MAX_STORE_TOKENS, 4M entries: Zipf(1.2) ids mod 32000 in arrays of 255,
    n-grams 1-4): 79.1 MB held after building (63.1 MB of sorted ends, 16.0 MB of tokens), 330 MB peak while
    building (the sort's int64 temporaries), 9 s to build; a lookup costs 0.1-0.6 ms (two binary searches).
    Each n-gram's range in its order is kept once found (`ranges`, at most MAX_RANGES n-grams, a few hundred
    bytes each with the key and value tuples and the dict slot, so some 20 MB at the cap, not measured; dropped
    all at once when full): a calibration search looks the same n-grams up in every trial.
    """

    def __init__(self, tokens: np.ndarray, min_ngram: int, max_ngram: int) -> None:
        self.tokens = tokens  # (entries,) int32, SEPARATOR between arrays
        self.orders: dict[int, np.ndarray] = {}
        self.ranges: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> [low, high) in orders[len(gram)]
        separator = tokens == SEPARATOR
        before = np.concatenate([[0], np.cumsum(separator)])  # before[i]: separators in tokens[:i]
        for n in range(min_ngram, max_ngram + 1):
            ends = np.arange(n - 1, len(tokens) - 1)
            ends = ends[~separator[ends + 1] & (before[ends + 1] == before[ends + 1 - n])]
            keys = [ends] + [tokens[ends - back] for back in range(n)]  # lexsort: the last key sorts first
            self.orders[n] = ends[np.lexsort(keys)].astype(np.int32)

    def latest(self, gram: tuple[int, ...], cap: int) -> list[int]:
        """The latest `cap` end positions of `gram`, oldest first."""
        order = self.orders.get(len(gram))
        if order is None or not len(order):
            return []
        found = self.ranges.get(gram)
        if found is None:
            found = self.ranges[gram] = self.range_of(gram, order)
            if len(self.ranges) > MAX_RANGES:
                self.ranges.clear()
        low, high = found
        return order[max(low, high - cap):high].tolist()

    def range_of(self, gram: tuple[int, ...], order: np.ndarray) -> tuple[int, int]:
        """[low, high): where the n-gram's end positions lie in `order` (its n's), by two binary searches."""
        n = len(gram)

        def key(i: int) -> tuple[int, ...]:
            end = int(order[i])
            return tuple(self.tokens[end - n + 1:end + 1].tolist())

        low = bisect_left(range(len(order)), gram, key=key)
        return low, bisect_right(range(len(order)), gram, lo=low, key=key)


@dataclass(frozen=True, eq=False)
class SuffixStore:
    """Token arrays drafted from beside the text itself (e.g. a domain's own earlier outputs), indexed once.

    `tokens` (entries,) int32 is the arrays joined by SEPARATOR, read-only. Build it with
    `SuffixStore.of(arrays, config)`; the index depends on config's n-gram sizes only (not on max_occurrences).
    """

    tokens: np.ndarray
    index: StoreIndex = field(repr=False)
    arrays: int = 0

    @classmethod
    def of(cls, arrays: Iterable[Sequence[int] | torch.Tensor], config: SuffixTreeConfig) -> "SuffixStore":
        parts: list[np.ndarray] = []
        for number, array in enumerate(arrays):
            values = store_array(array, number)
            parts.extend([values, np.array([SEPARATOR], dtype=np.int32)])
        joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
        joined.setflags(write=False)
        return cls(tokens=joined, index=StoreIndex(joined, config.min_ngram, config.max_ngram),
                   arrays=len(parts) // 2)


def expected_accepted(nodes: list[list]) -> float:
    """A tree's expected accepted tokens: the sum of its nodes' estimated path probabilities (nodes as
    `SuffixTreeSession.matched_nodes` lists them, [token, parent, path probability, depth])."""
    return float(sum(node[2] for node in nodes))


def store_array(array: Sequence[int] | torch.Tensor | np.ndarray, number: int) -> np.ndarray:
    """One store array as int32 token ids, refusing anything else with a clear error."""
    problem = KnnSsdError(f"store array {number} holds something other than token ids (ints >= 0, < 2^31)",
                          fix="give the store as sequences of token ids, e.g. outputs' token_ids")
    if isinstance(array, (torch.Tensor, np.ndarray)):
        values = np.asarray(array.cpu() if isinstance(array, torch.Tensor) else array)
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise problem
    else:
        values = list(array)
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise problem
        values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= 2 ** 31):
        raise problem
    return values.astype(np.int32)


@dataclass(frozen=True)
class SuffixTreeDrafter:
    """Drafts a token tree of the continuations of the text's latest suffix; no draft model, no forward pass.

    `successors`: a warm start for the recycled successors (used only with `recycled_nodes` > 0); each
    generation starts from it and keeps its own updates (`recycled.Successors`). `store` / `union`: the stores
    drafted from beside the text, as `config.store_scope` picks them ("own": store; "union": union; "both": the
    better candidate tree of the two per step); None: that store is empty.

    Example:
        >>> drafter = SuffixTreeDrafter(SuffixTreeConfig(max_tree_nodes=15, min_path_prob=0.1))
        >>> result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=64), drafter)
        >>> result.stats.mean_accepted_tokens, result.stats.mean_verify_width
        >>> with_store = SuffixTreeDrafter.with_store([earlier.token_ids for earlier in results])
        >>> recycling = SuffixTreeDrafter(SuffixTreeConfig(max_tree_nodes=8, recycled_nodes=8))
        >>> both = SuffixTreeDrafter.with_store(own_arrays, SuffixTreeConfig(use_store=True, store_scope="both"),
        ...                                     union=own_arrays + other_domains_arrays)
    """

    config: SuffixTreeConfig = SuffixTreeConfig()
    store: SuffixStore | None = None
    successors: SuccessorTable | None = None
    union: SuffixStore | None = None

    @classmethod
    def with_store(cls, arrays: Iterable[Sequence[int] | torch.Tensor] | None,
                   config: SuffixTreeConfig = SuffixTreeConfig(),
                   union: Iterable[Sequence[int] | torch.Tensor] | None = None) -> "SuffixTreeDrafter":
        """A drafter that also looks the suffix up in `arrays` (token id sequences; None: no own store) and, as
        `config.store_scope` says, in `union` (the union of every domain's arrays), each indexed now."""
        return cls(config, None if arrays is None else SuffixStore.of(arrays, config),
                   union=None if union is None else SuffixStore.of(union, config))

    def stores(self) -> tuple[SuffixStore | None, ...]:
        """The stores whose candidate trees a step compares, own first: (store,), (union,) or (store, union)."""
        scope = self.config.store_scope
        return (self.store,) if scope == "own" else (self.union,) if scope == "union" else (self.store, self.union)

    def start(self) -> "SuffixTreeSession":
        return SuffixTreeSession(self.config, self.store, self.successors, self.stores())

    def describe(self) -> dict[str, object]:
        """The policy (the store and the warm start are not part of it)."""
        return {"kind": "suffix_tree", **self.config.to_dict()}


class SuffixTreeSession:
    """One generation's index of the text and recycled successors, and the drafter's store(s).

    `candidates`: the stores whose trees each step compares (`SuffixTreeDrafter.stores`), own first; default
    (store,)."""

    def __init__(self, config: SuffixTreeConfig, store: SuffixStore | None,
                 warm: SuccessorTable | None = None,
                 candidates: Sequence[SuffixStore | None] | None = None) -> None:
        self.config = config
        self.store = store
        self.candidates = tuple(candidates) if candidates is not None else (store,)
        self.index = OccurrenceIndex(config)
        self.successors = Successors(config.recycled_k, warm) if config.recycled_nodes > 0 else None

    def match(self, history: list[int], store: SuffixStore | None | str = "first"
              ) -> tuple[int, list[tuple[Sequence[int], int]]]:
        """(n, hits): the longest suffix of `history` (n tokens, n >= min_ngram) that occurred before, in the text
        or in `store` (default: the first candidate), and the (source tokens, end) of its latest occurrences,
        newest first, the text's before the store's; (0, []) when none did."""
        cap = self.config.max_occurrences
        store = self.candidates[0] if isinstance(store, str) else store
        sources = [(history, self.index)] + ([(store.tokens, store.index)] if store else [])
        for n in range(min(self.config.max_ngram, len(history)), self.config.min_ngram - 1, -1):
            gram = tuple(history[-n:])
            hits = [(tokens, end) for tokens, index in sources for end in reversed(index.latest(gram, cap))]
            if hits:
                return n, hits
        return 0, []

    def occurrences(self, history: list[int]) -> list[tuple[Sequence[int], int]]:
        """The hits of `match`."""
        return self.match(history)[1]

    def propose(self, request: DraftRequest) -> Draft:
        self.index.update(request.history)
        depth_limit = min(self.config.max_depth, request.max_tokens)
        nodes = self.best_tree(request.history, depth_limit)
        if self.successors is not None:
            self.add_recycled(nodes, request.history[-1], depth_limit)
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i][2], nodes[i][3], i))
        new_index = {old: new for new, old in enumerate(order)}
        kept_parents = [new_index[nodes[i][1]] if nodes[i][1] >= 0 else -1 for i in order]
        device = request.last_token.device
        is_path = all(parent == i - 1 for i, parent in enumerate(kept_parents))
        return Draft(tokens=torch.tensor([nodes[i][0] for i in order], dtype=torch.long, device=device), probs=None,
                     parents=None if is_path else torch.tensor(kept_parents, dtype=torch.long, device=device))

    def candidate_tree(self, history: list[int], store: SuffixStore | None, depth_limit: int) -> list[list]:
        """The pruned trie (`matched_nodes`) of the latest suffix's continuations in the text and `store`, its
        depth capped by the adaptive rule where that is on."""
        matched, hits = self.match(history, store)
        adaptive = self.config.match_depth(matched)
        return self.matched_nodes(hits, depth_limit if adaptive is None else min(depth_limit, adaptive))

    def best_tree(self, history: list[int], depth_limit: int) -> list[list]:
        """The candidate tree (one per store in `candidates`) of the largest expected accepted tokens, the sum of
        its nodes' path probabilities; the earlier candidate (the own store) wins ties."""
        best: list[list] | None = None
        best_value, seen = 0.0, []
        for store in self.candidates:
            if any(store is done for done in seen):  # the same store twice (e.g. a one-domain union): one tree
                continue
            seen.append(store)
            nodes = self.candidate_tree(history, store, depth_limit)
            value = expected_accepted(nodes)
            if best is None or value > best_value:
                best, best_value = nodes, value
        return best if best is not None else []

    def matched_nodes(self, hits: list[tuple[Sequence[int], int]], depth_limit: int) -> list[list]:
        """The pruned trie of the hits' continuations to `depth_limit`: nodes [token, parent, path probability,
        depth], parents before children, in the order kept (most probable, then shallower, then made first)."""
        tokens, parents, counts, depths = [], [], [], []  # the trie, nodes in creation order
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for source, end in hits:
            node = -1
            following = source[end + 1:end + 1 + max(depth_limit, 0)]
            for token in (following if isinstance(following, list) else following.tolist()):
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
        return [[tokens[i], new_index[parents[i]] if parents[i] >= 0 else -1, counts[i] / len(hits), depths[i]]
                for i in kept]

    def add_recycled(self, nodes: list[list], last_token: int, depth_limit: int) -> None:
        """Up to `recycled_nodes` nodes from the recycled successors, added to `nodes` in place, best first (see
        the module docstring); a candidate that is already a child of its parent is not added."""
        children = {(parent, token): i for i, (token, parent, _, _) in enumerate(nodes)}
        frontier: list[tuple[float, int, int, int, int]] = []  # (-probability, depth, order, parent, token)
        offered = itertools.count()

        def offer(parent: int, token: int, probability: float, depth: int) -> None:
            if depth < depth_limit:
                for rank, successor in enumerate(self.successors.get(token)):
                    heapq.heappush(frontier, (-probability * RANK_PRIOR[rank], depth + 1, next(offered), parent,
                                              successor))

        offer(-1, last_token, 1.0, 0)
        for i, (token, _, probability, depth) in enumerate(nodes):
            offer(i, token, probability, depth)
        added = 0
        while frontier and added < self.config.recycled_nodes:
            negative, depth, _, parent, token = heapq.heappop(frontier)
            if (parent, token) in children:
                continue
            children[parent, token] = len(nodes)
            nodes.append([token, parent, -negative, depth])
            added += 1
            offer(len(nodes) - 1, token, -negative, depth)

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing adapts."""

    def observe_logits(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """The loop's committed rows of a verify pass (see `DraftSession`): table[tokens[i]] = top successors of
        logits[i]. Nothing to do without recycled successors."""
        if self.successors is not None:
            self.successors.update(tokens.tolist(), top_successors(logits))

    def observe_successors(self, tokens: Sequence[int], successors: Sequence[Sequence[int]]) -> None:
        """`observe_logits` given the rows' top successors (`top_successors`) instead of the logits: what replay
        (`pipeline.replay`) passes from a recorded trace."""
        if self.successors is not None:
            self.successors.update(tokens, successors)
