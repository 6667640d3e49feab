"""The store stage of calibration, on the driver: one Ray task per domain builds its store (`pipeline.stores`)."""

from __future__ import annotations

import time
from typing import Any, Callable

from pipeline.stores import DomainStore


def build_stores(model: Any, prompts: dict[str, list[str]], max_new_tokens: int, batch_size: int,
                 log: Callable[[str], None], mix: str | None = None) -> dict[str, DomainStore]:
    """The store stage of calibration: one `pipeline.tasks.build_store` Ray task per domain (`model`: its
    `ModelSpec`; `prompts`: each domain's calibration prompts, all of them used), plus, under the name `mix`
    when given, the union of all stores (what the mix study drafts from). Logs each domain's size."""
    import ray

    from pipeline.cluster import task_resources
    from pipeline.tasks import build_store  # Ray and torch: only when the stage runs

    started = time.perf_counter()
    resources = task_resources(model.threads)
    refs = {domain: build_store.options(**resources).remote(model, domain, texts, max_new_tokens, batch_size)
            for domain, texts in prompts.items()}
    stores = {}
    for domain, ref in refs.items():
        stores[domain] = ray.get(ref)
        log(f"store: [{domain}] {len(stores[domain].outputs)} outputs, {stores[domain].tokens} tokens "
            f"({len(stores)}/{len(refs)}, {time.perf_counter() - started:.0f} s)")
    if mix is not None:
        stores[mix] = DomainStore.union(list(stores.values()), mix)
    return stores
