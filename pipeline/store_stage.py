"""The store stage of calibration, on the driver: one Ray task per domain builds its store (`pipeline.stores`),
and one more per `--corpus` tokenises the user's texts for that domain's store (`pipeline.corpus`)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from knnssd.bundle import MAX_STORE_TOKENS
from knnssd.errors import KnnSsdError
from pipeline.corpus import Corpus, check_corpus_tokens, corpus_entries
from pipeline.stores import DomainStore


def check_store_total(stores: dict[str, DomainStore], limit: int = MAX_STORE_TOKENS) -> None:
    """Refuse stores a bundle could not hold (`limit` entries, tokens and separators, over every domain), now
    rather than when the bundle is written after the searches."""
    entries = sum(len(output) + 1 for store in stores.values() for output in store.outputs)
    if entries > limit:
        raise KnnSsdError(f"the stores hold {entries} entries in all, more than a bundle holds ({limit})",
                          fix="lower --store-tokens, use fewer or smaller --corpus files, or calibrate fewer domains")


def build_stores(model: Any, prompts: dict[str, list[str]], max_new_tokens: int, batch_size: int,
                 log: Callable[[str], None], mix: str | None = None,
                 corpora: Sequence[Corpus] = ()) -> dict[str, DomainStore]:
    """The store stage of calibration: one `pipeline.tasks.build_store` Ray task per domain (`model`: its
    `ModelSpec`; `prompts`: each domain's calibration prompts, all of them used), each domain's corpus (at most
    one, checked by `pipeline.corpus.check_corpora`) tokenised in a Ray task of its own and added after the
    model's outputs, then the union of all stores in domain order, set as each domain's `union_store` (what its
    store_scope "union"/"both" policies draft from) and, under the name `mix` when given, added as a store itself
    (what the mix study drafts from; the same object, so a worker indexes it once per key). Corpus texts join the
    store's drafting text, not its successor table (the model did not decode them). Logs each domain's size and
    each corpus added. A corpus over `MAX_CORPUS_STORE_TOKENS` is refused before any store is waited for."""
    import ray

    from pipeline.cluster import task_resources
    from pipeline.tasks import MAX_RETRIES, build_store  # Ray and torch: only when the stage runs

    started = time.perf_counter()
    tokenise = ray.remote(max_retries=MAX_RETRIES)(corpus_entries)  # a tokenizer only: one CPU, no GPU
    corpus_refs = {corpus.domain: (corpus, tokenise.remote(model, corpus)) for corpus in corpora}
    resources = task_resources(model.threads)
    refs = {domain: build_store.options(**resources).remote(model, domain, texts, max_new_tokens, batch_size)
            for domain, texts in prompts.items()}
    extra = {}
    for domain, (corpus, ref) in corpus_refs.items():
        keys, outputs = ray.get(ref)
        check_corpus_tokens(corpus, sum(len(o) for o in outputs))
        extra[domain] = (corpus, keys, outputs)
    stores = {}
    for domain, ref in refs.items():
        stores[domain] = ray.get(ref)
        log(f"store: [{domain}] {len(stores[domain].outputs)} outputs, {stores[domain].tokens} tokens "
            f"({len(stores)}/{len(refs)}, {time.perf_counter() - started:.0f} s)")
        if domain in extra:
            corpus, keys, outputs = extra[domain]
            store = stores[domain]
            stores[domain] = replace(store, prompts=store.prompts + keys, outputs=store.outputs + outputs,
                                     successors=None if store.successors is None  # corpus texts: no rows
                                     else store.successors + tuple(() for _ in outputs))
            log(f"store: [{domain}] + corpus {corpus.name}: {len(keys)} texts, "
                f"{sum(len(o) for o in outputs)} tokens")
    check_store_total(stores)
    union = DomainStore.union(list(stores.values()), mix or "union")
    stores = {domain: replace(store, union_store=union) for domain, store in stores.items()}
    if mix is not None:
        stores[mix] = union
    return stores
