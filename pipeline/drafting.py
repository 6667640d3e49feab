"""The drafter of a policy for one prompt, in calibration: a store-drafting suffix tree never sees the prompt's own
output.

A suffix-tree policy with `use_store` drafts from its domain's store (`pipeline.stores.DomainStore`), the model's
greedy outputs of the domain's calibration prompts. Measured on calibration prompt p, it must draft from the store
without p's output, else it would look up its own future; so every prompt drafts from `store.arrays(exclude=p)`.
A held-out prompt is in no store, so it drafts from the whole store, as the bundle's runtime does. A suffix-tree
policy with `use_warm` starts from its store's warm successor table the same way: on calibration prompt p, the
table without p's rows (`store.table(exclude=p)`), else it would start from its own future's successors. A
use_store policy with store_scope "union" or "both" drafts from the union of every domain's store
(`store.union_store`, which holds p's output too) the same way: on calibration prompt p, the union without p's
output (`store.union_store.arrays(exclude=p)`).

Indexing a store is the costly part of making such a drafter, and a search makes one per trial and prompt, so
`PolicyDrafters` keeps the indexed stores (`SuffixStore`) of a worker, one per (store, prompt excluded, n-gram
range; the union is a store of its own here): what the index depends on (not the occurrences kept, which a
lookup takes from the index), and the warm tables, one per (store, prompt excluded). Other policies are made as `knnssd.engine.policy` makes them.
"""

from __future__ import annotations

from typing import Any

from knnssd.engine.drafters import Drafter, SuccessorTable, SuffixStore, SuffixTreeConfig, SuffixTreeDrafter
from knnssd.errors import KnnSsdError
from knnssd.engine.policy import drafter_from_policy, suffix_tree_config, uses_store, uses_warm
from pipeline.stores import DomainStore

MAX_INDEXED = 512  # indexed stores kept per worker (a search needs prompts x n-gram ranges)
MAX_TABLES = 64  # warm tables kept per worker (one per prompt excluded; each up to vocab x 8 int32)


class PolicyDrafters:
    """Drafters of policies for prompts, with the stores they draft from indexed once per worker.

    Example:
        >>> drafters = PolicyDrafters(num_layers=30)
        >>> drafter = drafters.drafter({"kind": "suffix_tree", "use_store": True}, store, prompt_text)
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.indexed: dict[tuple, tuple[DomainStore, SuffixStore]] = {}
        self.tables: dict[tuple, tuple[DomainStore, SuccessorTable]] = {}

    def drafter(self, policy: dict[str, Any], store: DomainStore | None, prompt: str | None = None) -> Drafter | None:
        """The drafter of `policy` measured on the prompt of text `prompt`; `store`: the policy's domain store
        (None: the domain has none, and a use_store or use_warm policy is refused)."""
        store_used, warm_used = uses_store(policy), uses_warm(policy)
        if not store_used and not warm_used:
            return drafter_from_policy(policy, self.num_layers)
        if store is None or (warm_used and store.successors is None):
            field = "use_store" if store is None and store_used else "use_warm"
            raise KnnSsdError(f"the policy {policy} drafts from its domain's "
                              f"{'store' if field == 'use_store' else 'warm successor table'}, but its domain has none",
                              fix=f'build the domain\'s store (with its successors) first, or set "{field}": false')
        if prompt is None:
            raise KnnSsdError("a policy drafting from its domain's store or warm table is measured on a prompt whose "
                              "text is unknown, so its own output could not be left out",
                              fix="pass the prompts' texts")
        config = suffix_tree_config(policy)
        exclude = prompt if prompt in store.prompts else None
        warm = self.table(store, exclude) if warm_used else None
        if not store_used:
            return SuffixTreeDrafter(config, None, warm)
        own, union = config.store_scope != "union", config.store_scope != "own"
        if union and store.union_store is None:
            raise KnnSsdError(f"the policy {policy} drafts from the union of every domain's store (store_scope "
                              f"{config.store_scope!r}), but the store of domain {store.domain!r} carries no union",
                              fix="build the stores with pipeline.store_stage.build_stores (which sets each "
                                  "domain's union_store), or set \"store_scope\": \"own\"")
        return SuffixTreeDrafter(config, self.index(store, prompt, config) if own else None, warm,
                                 self.index(store.union_store, prompt, config) if union else None)

    def index(self, store: DomainStore, prompt: str, config: SuffixTreeConfig) -> SuffixStore:
        """`store` without prompt `prompt`'s output (if it is one of its prompts), indexed for config's n-gram
        sizes, once per worker."""
        exclude = prompt if prompt in store.prompts else None
        key = (id(store), exclude, config.min_ngram, config.max_ngram)
        if key not in self.indexed:
            if len(self.indexed) >= MAX_INDEXED:
                self.indexed.pop(next(iter(self.indexed)))  # the oldest
            self.indexed[key] = (store, SuffixStore.of(store.arrays(exclude=exclude), config))  # store: keeps id
        return self.indexed[key][1]

    def table(self, store: DomainStore, exclude: str | None) -> SuccessorTable:
        """The store's warm table without prompt `exclude`'s rows, built once per worker."""
        key = (id(store), exclude)
        if key not in self.tables:
            if len(self.tables) >= MAX_TABLES:
                self.tables.pop(next(iter(self.tables)))  # the oldest
            self.tables[key] = (store, store.table(exclude=exclude))  # store: keeps id(store) unique
        return self.tables[key][1]
