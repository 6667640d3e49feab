"""KV-cache handling for draft-then-verify decoding on transformers 5 caches.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the whole layer's
cache every step: 69 MB a step for SmolLM2 at context 1500, 12 ms of a 49 ms plain step on a 2-core CPU
(BENCHMARKS.md section 23). `PreallocatedLayer` writes each step's entries into a buffer with room to spare and
hands attention a view of the filled part; the buffer doubles (one copy) when full. Cropping is a length change.
The keys and values attention sees are the same numbers in the same order, only not copied.

Two facts of transformers 5's caches shape the rest of this module:
- a sub-layer skipped while drafting writes nothing to its cache layer, so after
  drafting the layers hold different numbers of tokens;
- `crop(n)` only accepts ``n <= 0`` (tokens to remove).

`rollback(cache, length)` therefore crops each layer on its own to the common
committed length. Rollback is "forget what came after `length`". After a token tree's
verify pass, `keep_tail` first moves the accepted path's entries together, then `rollback` crops.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

HEADROOM = 256  # entries a new buffer holds beyond its first write (a prompt): room for many steps before it grows


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose entries live in a buffer (batch, kv_heads, capacity, head_dim).

    `keys` / `values` are views of the buffer's first `length` entries, so `DynamicLayer`'s crop (a slice), its
    length and every reader work unchanged; `update` writes in place instead of concatenating.
    """

    def __init__(self) -> None:
        super().__init__()
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value states (batch, kv_heads, n, head_dim) after the held entries; return the views of all
        (batch, kv_heads, length + n, head_dim)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2] or self.keys.shape[0] != key_states.shape[0]:
            self._grow(key_states, value_states, length, end)
        self.key_buffer[:, :, length:end] = key_states
        self.value_buffer[:, :, length:end] = value_states
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        """New buffers of capacity max(2 * end, end + HEADROOM), holding the first `length` entries."""
        capacity = max(2 * end, end + HEADROOM)
        with torch.inference_mode(False):  # normal tensors: writable in and out of inference mode
            keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty cache for `model` that can be rolled back.

    Full-attention layers are `PreallocatedLayer`s. Sliding-window layers (Mistral) stay transformers' own and
    keep their past until cropped, so that a rejected draft can be removed even once the window is full.
    """
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
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
