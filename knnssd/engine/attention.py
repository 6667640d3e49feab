"""Attention for decoding steps: the engine's batch-invariant kernel, or query heads grouped on their key/value heads.

A model's attention goes through `step_attention`, registered with transformers under IMPLEMENTATION, with
transformers' SDPA mask, when `knnssd.engine.kernels.accelerate` switches its config's attention implementation
(CPU fp32; `restore` switches back). For a step of 1-32 query tokens it runs, in order of preference:

- the kernels' `rows_attention` (knnssd/engine/csrc/rows_kernels.cpp), where `use_rows_kernel` gave the model
  one: every query row attends to the keys its mask row marks, in cache order, by the same operations whatever the
  number of rows, so a verify row (causal or a token tree's, `knnssd.engine.tree.tree_mask`) computes the bits the
  1-token plain step at that position computes. Masks must be bool (True: attend) or absent (causal);
- for 2-16 query tokens of a grouped-query model (SmolLM2: 9 query heads share 3 key/value heads), the library
  path `grouped_sdpa`: transformers folds the query heads onto the key/value heads for one token ("pack_gqa"), but
  for 2-16 tokens with a mask it copies each layer's cached keys and values once per query head (`repeat_kv`), 2-4
  ms of a 45-55 ms pass on SmolLM2 at context 200 (BENCHMARKS.md section 11). Query (batch, heads, q, dim)
  becomes (batch, kv_heads, groups * q, dim), row g * q + i being query head (kv_head * groups + g) at position i;
  the mask (batch, 1, q, kv) is repeated over the groups; one SDPA call on the cache as it is.

Everything else (prefills, per-head masks, float masks, softcap, sinks, position biases, attention weights asked
for) goes to transformers' own `sdpa_attention_forward` unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPLEMENTATION = "knnssd_grouped_sdpa"
BASE_IMPLEMENTATION = "sdpa"
MAX_GROUPED_QUERIES = 16  # the library path's verify passes; longer inputs keep transformers' path
MAX_KERNEL_QUERIES = 32  # the kernel's widest step (`knnssd.engine.kernels.MAX_FAST_ROWS`)
KERNEL_ATTRIBUTE = "_knnssd_rows_attention"  # set on each attention module that uses the kernel
BATCH_KEYWORD = "knnssd_batch"  # the forward keyword carrying a batched pass's plan (`knnssd.engine.batch`)
_PASSED_THROUGH = ("softcap", "s_aux", "position_bias")  # features only transformers' path implements


def step_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention output (batch, q, heads, dim) for query (batch, heads, q, dim) and key/value
    (batch, kv_heads, kv, dim), as transformers' `sdpa_attention_forward` returns it. In a batched pass (the
    forward carries a `knnssd.engine.batch.BatchPlan` as BATCH_KEYWORD) each request's rows attend to their own
    cache by this function, one request at a time."""
    plan = kwargs.pop(BATCH_KEYWORD, None)
    if plan is not None:
        return plan.attend(module, query, dropout, scaling, is_causal, kwargs)
    kernel = getattr(module, KERNEL_ATTRIBUTE, None)
    batch, heads, queries, dim = query.shape
    if (kernel is not None and batch == 1 and 1 <= queries <= min(MAX_KERNEL_QUERIES, key.shape[2])
            and heads % key.shape[1] == 0 and not dropout and query.dtype == key.dtype == torch.float32
            and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                            and attention_mask.shape[:3] == (1, 1, queries)))
            and key.stride(-1) == 1 and value.stride(-1) == 1
            and not kwargs.get("output_attentions") and all(kwargs.get(name) is None for name in _PASSED_THROUGH)):
        scale = scaling if scaling is not None else dim ** -0.5
        mask = attention_mask[0, 0] if attention_mask is not None else None  # (q, kv); None: causal
        out = kernel(query[0].transpose(0, 1), key[0], value[0], mask, float(scale))  # (q, heads, dim)
        return out.unsqueeze(0), None
    return grouped_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The library path: query heads grouped on their key/value heads for 2-16 query tokens with a mask, else
    transformers' own SDPA. Shapes as `step_attention`'s."""
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
    """Make IMPLEMENTATION known to transformers (idempotent): `step_attention`, SDPA's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, step_attention)
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


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules: those transformers hands to the attention function (they carry
    `num_key_value_groups`, as every decoder of the Llama family's does)."""
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups")]


def use_rows_kernel(model: nn.Module, kernel: Callable[..., torch.Tensor] | None) -> bool:
    """Give every attention module of `model` the kernels' `rows_attention` (None: take it away) and switch an
    SDPA model's attention to IMPLEMENTATION; whether the model now attends with the kernel (an eager or other
    attention implementation keeps its own)."""
    modules = attention_modules(model)
    if kernel is None or not modules or not (uses(model, BASE_IMPLEMENTATION) or uses(model, IMPLEMENTATION)):
        for module in modules:
            if KERNEL_ATTRIBUTE in vars(module):
                delattr(module, KERNEL_ATTRIBUTE)
        return False
    for module in modules:
        setattr(module, KERNEL_ATTRIBUTE, kernel)
    register()
    set_implementation(model, IMPLEMENTATION)
    return True


def rows_kernel_of(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The kernel `use_rows_kernel` gave the model's attention, or None."""
    return next((vars(m)[KERNEL_ATTRIBUTE] for m in attention_modules(model) if KERNEL_ATTRIBUTE in vars(m)), None)
