"""KV-cache handling for draft-then-verify decoding on transformers 5 caches.

Two facts of transformers 5's `DynamicCache` shape this module:
- a sub-layer skipped while drafting writes nothing to its cache layer, so after
  drafting the layers hold different numbers of tokens;
- `DynamicLayer.crop(n)` only accepts ``n <= 0`` (tokens to remove).

`rollback(cache, length)` therefore crops each layer on its own to the common
committed length. Rollback is "forget what came after `length`". After a token tree's
verify pass, `keep_tail` first moves the accepted path's entries together, then `rollback` crops.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty cache for `model` that can be rolled back.

    Sliding-window layers (Mistral) keep their past until cropped, so that a
    rejected draft can be removed even once the window is full.
    """
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


def rollback(cache: DynamicCache, length: int) -> None:
    """Crop every layer of `cache` to its first `length` tokens.

    Layers already at or below `length` (skipped while drafting) are left alone,
    apart from sliding-window layers, whose ``crop(0)`` trims recorded past back to
    the window. A layer shorter than `length` would mean lost state: that is a bug.
    """
    for index, layer in enumerate(cache.layers):
        held = layer.get_seq_length()
        if held < length and getattr(layer, "is_initialized", True):
            raise RuntimeError(f"cache layer {index} holds {held} tokens, fewer than the {length} committed")
        if held > length or getattr(layer, "is_sliding", False):
            layer.crop(length - held)


def keep_tail(cache: DynamicCache, width: int, keep: list[int]) -> None:
    """Keep, of the last `width` entries of every layer (one verify pass's), only those at offsets `keep`
    (increasing), moved to the front of that tail in order; the rest of the tail is left for `rollback` to crop.

    A token tree's verify pass writes [last token, node 0, ..., node k-1] (width k + 1); the accepted path
    [0, 1 + a_1, ..., 1 + a_n] becomes contiguous, so `rollback(cache, position + 1 + n)` then leaves exactly the
    committed tokens. Each layer's keys/values are (batch, kv_heads, length, head_dim); the entries are copied as
    computed (their rotary phases are those of their depth, which equals their new slot). Layers that hold fewer
    than `width` entries (not written by the pass) are a bug.
    """
    offsets = torch.tensor(keep, dtype=torch.long)
    for index, layer in enumerate(cache.layers):
        length = layer.keys.shape[-2] if getattr(layer, "is_initialized", True) else 0
        if length < width:
            raise RuntimeError(f"cache layer {index} holds {length} entries, fewer than the {width} of the pass")
        start = length - width
        source = (offsets + start).to(layer.keys.device)
        # advanced indexing copies first, so overlapping source and destination slots are safe
        layer.keys[:, :, start:start + len(keep)] = layer.keys[:, :, source]
        layer.values[:, :, start:start + len(keep)] = layer.values[:, :, source]
