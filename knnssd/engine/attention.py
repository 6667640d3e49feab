"""Attention for verify passes: query heads grouped by their key/value head, instead of copied keys and values.

A model with grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads) runs transformers' SDPA
path. For one query token transformers folds the query heads onto the key/value heads ("pack_gqa"), but for 2-16
query tokens with a mask (every verify pass) it copies each layer's whole cached keys and values once per query
head in the group (`repeat_kv`), 60 copies of the cache per pass, and attends over 9 heads instead of 3. That
cost 2-4 ms of a 45-55 ms pass on SmolLM2 at context 200 (BENCHMARKS.md section 11).

`grouped_sdpa` does what transformers does for one token, for 2-16 tokens: query (batch, heads, q, dim) becomes
(batch, kv_heads, groups * q, dim), row g * q + i being query head (kv_head * groups + g) at position i; the mask
(batch, 1, q, kv), causal or a token tree's (`knnssd.engine.tree.tree_mask`, bool), is repeated over the groups to
(batch, 1, groups * q, kv); one SDPA call on the cache as it is.
Each output element is the same dot products and softmax over the same keys as transformers' path. Everything
else (one token, prefills, no mask, per-head masks, softcap, sinks, position biases, attention weights asked
for) goes to transformers' own `sdpa_attention_forward` unchanged.

It is registered with transformers under IMPLEMENTATION, with transformers' SDPA mask, and a model uses it when
`knnssd.engine.kernels.accelerate` switches its config's attention implementation (CPU fp32; `restore` switches back).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPLEMENTATION = "knnssd_grouped_sdpa"
BASE_IMPLEMENTATION = "sdpa"
MAX_GROUPED_QUERIES = 16  # verify passes; longer inputs are prefills and keep transformers' path
_PASSED_THROUGH = ("softcap", "s_aux", "position_bias")  # features only transformers' path implements


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention output (batch, q, heads, dim) for query (batch, heads, q, dim) and key/value
    (batch, kv_heads, kv, dim), as transformers' `sdpa_attention_forward` returns it."""
    batch, heads, queries, dim = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    if (2 <= queries <= MAX_GROUPED_QUERIES and groups > 1 and key.shape[1] * groups == heads
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and attention_mask.shape[2] == queries
            and not kwargs.get("output_attentions") and all(kwargs.get(name) is None for name in _PASSED_THROUGH)):
        grouped = query.reshape(batch, key.shape[1], groups * queries, dim)
        mask = attention_mask.repeat(1, 1, groups, 1)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> None:
    """Make IMPLEMENTATION known to transformers (idempotent): the attention above, SDPA's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def uses(model: nn.Module, name: str) -> bool:
    """Whether the model's config names attention implementation `name`."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == name


def set_implementation(model: nn.Module, name: str) -> None:
    """Point the model's config (and each sub-config that names an attention implementation) at `name`."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for config in configs.values():
        if getattr(config, "_attn_implementation", None) in (BASE_IMPLEMENTATION, IMPLEMENTATION):
            config._attn_implementation = name
