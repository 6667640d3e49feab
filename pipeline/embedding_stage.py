"""Calibration's embedding stage: each calibration prompt's embedding, the vector routing compares with the anchors.

The store stage has already prefilled every calibration prompt of a domain with a store (`pipeline.store_decoding`
keeps each prefill's embedding), so those are taken from the stores; any other prompt is prefilled in a Ray task
(`pipeline.tasks.embed_prompts`). Both are the runtime's computation (`knnssd.engine.decoding.prefill`: the final
hidden state mean-pooled over the prompt), so the anchors sit where routing will look.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.stores import DomainStore
from pipeline.tasks import ModelSpec


def run_embeddings(model: ModelSpec, chunk: int, table: pa.Table, stores: dict[str, DomainStore],
                   log: Callable[[str], None]) -> np.ndarray:
    """(rows of `table`, hidden) float32 prompt embeddings: from the store stage's own prefills where a domain's
    store has the prompt's (the same computation as `pipeline.tasks.embed_prompts`), else prefilled in Ray tasks
    of `chunk` prompts each (`model`: the `ModelSpec`). Logs how many of each."""
    import ray

    from pipeline.cluster import task_resources
    from pipeline.tasks import embed_prompts

    started = time.perf_counter()
    prompts, domains = table["prompt"].to_pylist(), table["domain"].to_pylist()
    known = {domain: stores[domain].prompt_embeddings() for domain in set(domains) if domain in stores}
    rows: list[np.ndarray | None] = [known.get(d, {}).get(p) for d, p in zip(domains, prompts)]
    missing = [i for i, row in enumerate(rows) if row is None]
    texts = [prompts[i] for i in missing]
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    resources = task_resources(model.threads)
    computed = ray.get([embed_prompts.options(**resources).remote(model, c) for c in chunks])
    for i, row in zip(missing, (r for part in computed for r in part)):
        rows[i] = row
    log(f"embed: {len(rows) - len(missing)} prompts from the store stage's prefills, {len(missing)} prefilled "
        f"({time.perf_counter() - started:.0f} s)")
    return np.stack(rows).astype(np.float32)
