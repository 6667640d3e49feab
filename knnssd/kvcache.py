"""KV-cache handling for draft-then-verify decoding on transformers 5 caches.

Two facts of transformers 5's `DynamicCache` shape this module:
- a sub-layer skipped while drafting writes nothing to its cache layer, so after
  drafting the layers hold different numbers of tokens;
- `DynamicLayer.crop(n)` only accepts ``n <= 0`` (tokens to remove).

`rollback(cache, length)` therefore crops each layer on its own to the common
committed length. Rollback is "forget what came after `length`".
"""

from __future__ import annotations

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
