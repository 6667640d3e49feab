"""One verify pass over many requests: each request's rows, its own KV cache and its own mask.

A server's running requests each have their own cache, position and draft (a path or a token tree, from their
own routed policy). `knnssd.engine.decoding.step` packs every request's rows [last token, drafts] into one input
(1, N) with explicit positions and runs the model once, so each weight is read once for the whole batch:

- products: every linear layer multiplies all N rows at once (`knnssd.engine.kernels`: the C++ `rows_gemm` takes
  up to MAX_BATCH_ROWS rows with the per-row arithmetic of a 1-row step, so a request's rows compute the bits
  they would alone);
- the cache: `BatchCache` stands in for the model's cache during the pass. Each layer's `update` writes each
  request's slice of the new keys and values (segment [start, stop) of the N rows) into that request's own cache
  layer and keeps the views of each request's whole keys and values for attention;
- attention: `BatchPlan.attend` (called by `knnssd.engine.attention.step_attention` when the forward carries the
  plan as `knnssd_batch`) attends each request's query rows to its own keys with its own mask
  (`request_mask`: causal for a path, the tree's ancestors for a token tree), by the same attention function a
  single request's pass uses, so a request never sees another's keys;
- everything else in a decoder layer (norms, rotary embeddings at each row's own position, the MLP) works row by
  row.

What can be batched (`can_batch`): SDPA attention (the engine's IMPLEMENTATION is switched on for the pass where
the model uses plain SDPA, e.g. on a GPU) and full-attention cache layers only (`PreallocatedLayer`); a
sliding-window layer's mask depends on its window and keeps the one-request path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine import attention
from knnssd.engine.kernels import MAX_BATCH_ROWS, batched_rows
from knnssd.engine.kvcache import PreallocatedLayer
from knnssd.engine.tree import ancestors

BATCH_KEYWORD = attention.BATCH_KEYWORD  # the forward keyword that carries the plan down to the attention function


def can_batch(model: PreTrainedModel, caches: list[DynamicCache], rows: int) -> bool:
    """Whether one pass of `rows` rows over these requests' caches can run packed: the model attends with SDPA (or
    the engine's implementation of it), every cache layer is a full-attention `PreallocatedLayer`, and the rows fit
    one product (MAX_BATCH_ROWS), and its rotary embedding does not depend on the longest position in the input
    (dynamic and longrope scaling do: one request's position would change another's angles)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in (attention.BASE_IMPLEMENTATION, attention.IMPLEMENTATION) or rows > MAX_BATCH_ROWS:
        return False
    kinds = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", "default")
    if any("dynamic" in kind or kind == "longrope" for kind in (kinds.values() if isinstance(kinds, dict)
                                                                 else [kinds])):
        return False  # their frequencies follow max(position_ids) over the whole packed input
    return all(type(layer) is PreallocatedLayer for cache in caches for layer in cache.layers)


def request_mask(cached: int, n: int, parents: list[int] | None, device: torch.device) -> torch.Tensor:
    """(1, 1, n, cached + n) bool, True where a row may attend: every cached key, and of the pass's own n rows a
    path's rows up to itself (causal) or a tree row's ancestors and itself (`knnssd.engine.tree.ancestors`; then
    n = 1 + len(parents))."""
    own = ancestors(parents).to(device) if parents is not None else \
        torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(n, cached, dtype=torch.bool, device=device), own], dim=1)[None, None]


class BatchCache:
    """The cache a batched forward sees: `update` scatters each request's segment of the new keys and values into
    that request's own cache layer. Holds the views attention needs, per layer, until the next layer's update."""

    def __init__(self, caches: list[DynamicCache], bounds: list[tuple[int, int]]) -> None:
        self.caches, self.bounds = caches, bounds
        self.views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value states (1, kv_heads, N, head_dim) of the pass's N rows; returns them unchanged (the attention
        reads each request's keys from `views`)."""
        self.views[layer_idx] = [
            cache.layers[layer_idx].update(key_states[:, :, start:stop], value_states[:, :, start:stop])
            for cache, (start, stop) in zip(self.caches, self.bounds)]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("a batched pass has no single cache length; positions are passed explicitly")


@dataclass(frozen=True)
class BatchPlan:
    """One packed pass: request i owns rows bounds[i] = [start, stop) of the N input rows, attends with
    masks[i] (1, 1, n_i, keys_i) bool to its own keys `cache.views[layer][i]`."""

    cache: BatchCache
    bounds: list[tuple[int, int]]
    masks: list[torch.Tensor]

    def attend(self, module: nn.Module, query: torch.Tensor, dropout: float, scaling: float | None,
               is_causal: bool | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        """Attention output (1, N, heads, dim) for query (1, heads, N, dim): each request's rows by
        `attention.step_attention` on its own keys, values and mask."""
        views = self.cache.views[module.layer_idx]
        outputs = []
        for (start, stop), (keys, values), mask in zip(self.bounds, views, self.masks):
            out, _ = attention.step_attention(module, query[:, :, start:stop], keys, values, mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
            outputs.append(out)
        return torch.cat(outputs, dim=1), None


@contextmanager
def batched_attention(model: PreTrainedModel) -> Iterator[None]:
    """Within the block the model attends through `attention.step_attention` (which reads the plan), also where
    it uses transformers' SDPA (no kernel plan: a GPU, another dtype); switched back in a ``finally``."""
    switch = attention.uses(model, attention.BASE_IMPLEMENTATION)
    if switch:
        attention.register()
        attention.set_implementation(model, attention.IMPLEMENTATION)
    try:
        yield
    finally:
        if switch:
            attention.set_implementation(model, attention.BASE_IMPLEMENTATION)


def packed_hidden(model: PreTrainedModel, caches: list[DynamicCache], input_ids: list[torch.Tensor],
                  positions: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Final hidden states (N, hidden) of one pass over every request's rows: input_ids[i] and positions[i] (n_i,)
    for request i, whose cache holds exactly the keys masks[i] (1, 1, n_i, cached_i + n_i) marks before its rows.
    Each cache ends holding its request's n_i new entries, as a one-request pass leaves it."""
    bounds, start = [], 0
    for ids in input_ids:
        bounds.append((start, start + ids.shape[0]))
        start += ids.shape[0]
    plan = BatchPlan(cache=BatchCache(caches, bounds), bounds=bounds, masks=masks)
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids[0].device)  # 4D: taken as prepared
    with batched_attention(model), batched_rows():
        return model.model(input_ids=torch.cat(input_ids)[None], position_ids=torch.cat(positions)[None],
                           attention_mask=placeholder, cache=plan.cache, use_cache=True,
                           **{BATCH_KEYWORD: plan}).last_hidden_state[0]
