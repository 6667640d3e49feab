"""KV-cache handling for draft-then-verify decoding on transformers 5 caches.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the whole layer's
cache every step: 69 MB a step for SmolLM2 at context 1500, 12 ms of a 49 ms plain step on a 2-core CPU
(BENCHMARKS.md section 23). `PreallocatedLayer` writes each step's entries into a buffer with room to spare and
hands attention a view of the filled part; the buffer doubles (one copy) when full. Cropping is a length change.
On CPU, buffers of 2 MB or more lie on huge pages, as the weights do (`_buffer`).
The keys and values attention sees are the same numbers in the same order, only not copied.

Capacity: a request reaches at most `request_reach(prompt, max_new_tokens)` positions (the last committed token
plus the widest verify pass the kernels serve), so `new_cache(model, capacity=...)` caps every buffer there: the
first write (the prompt) reserves min(max(2 x end, end + HEADROOM), capacity) positions, not 2 x the prompt, and
doubling stops at the capacity. A write past the capacity (a drafter's tree wider than the caller counted) is not
an error: the buffer grows to exactly what that write needs, one copy each time, so memory never exceeds what was
written. Without a capacity (None, the default) the growth is as before: max(2 x end, end + HEADROOM).

Two facts of transformers 5's caches shape the rest of this module:
- a sub-layer skipped while drafting writes nothing to its cache layer, so after
  drafting the layers hold different numbers of tokens;
- `crop(n)` only accepts ``n <= 0`` (tokens to remove).

`rollback(cache, length)` therefore crops each layer on its own to the common
committed length. Rollback is "forget what came after `length`". After a token tree's
verify pass, `keep_tail` first moves the accepted path's entries together, then `rollback` crops.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from knnssd.engine.kernels import MAX_FAST_ROWS
from knnssd.engine.weights import HUGE_PAGE, arena
from knnssd.errors import KnnSsdError

HEADROOM = 256  # entries a new buffer holds beyond its first write (a prompt): room for many steps before it grows
HUGE_BUFFER_BYTES = HUGE_PAGE  # CPU buffers of a huge page or more lie on huge pages (`_buffer`)


def request_reach(prompt_length: int, max_new_tokens: int, widest_pass: int = MAX_FAST_ROWS) -> int:
    """The most positions a request's cache holds: the committed history stays below prompt + max_new_tokens,
    and a verify pass (or a drafter's forward) writes at most `widest_pass` entries past the last committed one.
    Generous by at most `widest_pass` positions."""
    return prompt_length + max_new_tokens + widest_pass


def check_capacity(capacity: int | None) -> int | None:
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise KnnSsdError(f"a KV cache capacity must be a positive number of positions or None, got {capacity!r}",
                          fix="pass request_reach(prompt_length, max_new_tokens), or None for unbounded growth")
    return capacity


def grown_capacity(end: int, capacity: int | None = None) -> int:
    """Positions a new buffer holds for a write that reaches `end`: max(2 x end, end + HEADROOM), capped at
    `capacity` when one is set, and never below `end` (a write past the capacity gets exactly `end`)."""
    wanted = max(2 * end, end + HEADROOM)
    return wanted if capacity is None else max(end, min(wanted, capacity))


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose entries live in a buffer (batch, kv_heads, capacity, head_dim).

    `keys` / `values` are views of the buffer's first `length` entries, so `DynamicLayer`'s crop (a slice), its
    length and every reader work unchanged; `update` writes in place instead of concatenating. `capacity` (None:
    unbounded) caps the buffer's positions as `grown_capacity` says.
    """

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__()
        self.capacity = check_capacity(capacity)
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

    def reserve(self, end: int) -> None:
        """Room in the buffers for entries up to position `end` (grown as `update` grows them), for a kernel that
        writes a step's keys and values in place (`knnssd.engine.fastlayer`); `commit(end)` then shows them."""
        if end > self.key_buffer.shape[-2]:
            self._grow(self.keys, self.values, self.get_seq_length(), end)

    def commit(self, end: int) -> None:
        """The views `keys` / `values` now cover the buffers' first `end` entries (written in place)."""
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        """New buffers of `grown_capacity(end, self.capacity)` positions, holding the first `length` entries."""
        capacity = grown_capacity(end, self.capacity)
        with torch.inference_mode(False):  # normal tensors: writable in and out of inference mode
            keys = _buffer((*key_states.shape[:2], capacity, key_states.shape[-1]), key_states)
            values = _buffer((*value_states.shape[:2], capacity, value_states.shape[-1]), value_states)
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An empty tensor of `shape` with `like`'s dtype and device; on CPU, from HUGE_BUFFER_BYTES on, on huge pages
    (`knnssd.engine.weights.arena`, one mapping a buffer), as the weights are: a step over a long cache streams it
    all (30 SmolLM2 layers' attention over 1500 keys: 2.3 ms on huge pages, 3.0 ms on 4 KB pages; BENCHMARKS
    41). Smaller buffers would waste most of a 2 MB page each."""
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or nbytes < HUGE_BUFFER_BYTES:
        return like.new_empty(shape)
    return arena(nbytes)[0].view(like.dtype).view(shape)


def new_cache(model: PreTrainedModel, capacity: int | None = None) -> DynamicCache:
    """An empty cache for `model` that can be rolled back.

    Full-attention layers are `PreallocatedLayer`s holding at most `capacity` positions each (a request's reach,
    `request_reach`; None: grow without a cap, as before). Sliding-window layers (Mistral) stay transformers' own
    and keep their past until cropped, so that a rejected draft can be removed even once the window is full.
    """
    check_capacity(capacity)
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
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
