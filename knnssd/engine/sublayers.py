"""Temporarily skip attention and MLP sub-layers of a decoder-only model.

`skip_sublayers(model, skip_set)` swaps the chosen sub-layer modules for stubs
that return zeros, so each decoder layer's residual connection passes its input
through unchanged: ``h = h + 0``. A skipped attention sub-layer writes nothing
to the KV cache, so cache layers drift apart in length while drafting; the
decoding loop crops every layer back to the committed length afterwards.

No skip state in module globals: the skip set lives only on the model, only inside
the block, and the original modules come back in a ``finally`` even after an exception.
The model itself is the shared state, so the block is exclusive: a second
`skip_sublayers` on a model already inside one (nested, or from another thread)
is refused with an error. Were it allowed, the inner block would save the outer
one's stubs as "the originals", and unwinding in the wrong order (enter A,
enter B, exit A, exit B) would leave a stub in place for good. Generation on a
model is serialised by `model_lock` (see knnssd.engine.decoding), so the runtime never
overlaps two blocks.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from knnssd.errors import KnnSsdError
from knnssd.engine.skipset import SkipSet

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

_SKIPPING_GUARD = threading.Lock()  # entering and leaving a block (stub check and swap) is atomic
_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


def model_lock(model: nn.Module) -> "threading.RLock":
    """The one re-entrant lock that serialises generation on `model` (created on first use).

    Every generation holds it for its whole length, so one model object serves one generation at a time
    however many threads call it: layer skipping changes the model itself, and a plain generation running
    beside a drafting one would see the skipped sub-layers."""
    with _SKIPPING_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class SkippedAttention(nn.Module):
    """Stands in for a skipped self-attention sub-layer.

    Returns ``(zeros, None)`` shaped like the input ``(batch, seq, hidden)``, as
    the real attention returns ``(output, weights)``; it never touches the cache.
    """

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for a skipped MLP sub-layer: zeros shaped ``(batch, seq, hidden)``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM, checked to have ``self_attn`` and ``mlp``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or layers is None:
        raise KnnSsdError(
            f"model type {model_type!r} is not supported for layer-skip drafting",
            fix=f"use a model of the {', '.join(SUPPORTED_MODEL_TYPES)} families "
            "(decoder layers with self_attn and mlp sub-layers)",
        )
    for index, layer in enumerate(layers):
        if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp")):
            raise KnnSsdError(
                f"decoder layer {index} of this {model_type} model has no self_attn/mlp sub-layers",
                fix="use an unmodified Llama, Qwen2 or Mistral model",
            )
    return layers


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


@contextmanager
def skip_sublayers(model: nn.Module, skip_set: SkipSet) -> Iterator[None]:
    """Within the block, forward passes of `model` skip the sub-layers in `skip_set`.

    Example:
        >>> with skip_sublayers(model, SkipSet.of(attn=[20, 21], mlp=[25])):
        ...     draft_logits = model(input_ids=ids, ...).logits
        >>> # here the model is exactly as before, also after an exception inside the block
    """
    layers = decoder_layers(model)
    skip_set.validate(len(layers))
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    with _SKIPPING_GUARD:  # a stub in place means another block is active (an empty one changes nothing)
        if any(isinstance(layer.self_attn, SkippedAttention) or isinstance(layer.mlp, SkippedMLP) for layer in layers):
            raise KnnSsdError(
                "this model is already skipping sub-layers (a nested skip_sublayers, or one in another thread)",
                fix="finish the first block before entering another; serialise generation on one model with "
                    "knnssd.engine.sublayers.model_lock(model), or give each thread its own model")
        try:
            for index in skip_set.attn:
                saved.append((layers[index], "self_attn", layers[index].self_attn))
                layers[index].self_attn = SkippedAttention()
            for index in skip_set.mlp:
                saved.append((layers[index], "mlp", layers[index].mlp))
                layers[index].mlp = SkippedMLP()
        except BaseException:
            _restore(saved)
            raise
    try:
        yield
    finally:
        with _SKIPPING_GUARD:
            _restore(saved)


def _restore(saved: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for layer, name, module in reversed(saved):
        setattr(layer, name, module)
