"""A whole pass's decoder layers from one loop (CPU fp32, the engine's compiled kernels).

With each layer's step in one C++ call (`knnssd.engine.fastlayer`), what is left of a SmolLM2 plain step besides
the kernels is Python around each of its 30 layers: the module call, `fast_step`'s checks of its arguments, the
cache's bookkeeping. After a step has streamed half a gigabyte of weights through the CPU's caches, each of those
Python objects is a cache miss: 2.7 ms of a 19.3 ms plain pass were neither its layers' steps nor its LM head
(BENCHMARKS.md section 43). Installed as the forward of a Llama decoder model whose every layer has the fast step,
`fast_pass` makes the model forward's own calls (embedding, position ids, transformers' causal mask, rotary
embedding, final norm) and between them calls each layer's `LayerStep` in turn from one loop, with no module call
a layer. A plain step then takes 0.962 [0.936, 0.979] of its layer-by-layer time (a paired A/B, there); the
checks the pass needs to stand aside correctly keep part of the rest.

Each layer's step is the one `fastlayer.fast_step` makes (the same `LayerStep` on the same tensors), so every
output bit is that path's (tests/test_fastpass.py). A pass qualifies where:
- the decoder model's forward is Llama's own bytecode, given input_ids (1, T) with T <= MAX_FAST_ROWS and a
  `DynamicCache`, no keyword beyond cache_position, and the config asks for no hidden states, attentions or tuples;
- no forward or backward hook would fire on a decoder layer (none on the layers, none global);
- every decoder layer has the fast step installed as its forward, qualifies for it (`fastlayer.layer_fits`, its
  cache layer preallocated and holding the prompt) and would take its one call (`layer_step_usable`).
Anything else runs the class's forward, whose layers then take `fast_step` one by one. Where transformers' mask
turns out not to be one the kernels take, the layers run through their own calls as the class's loop runs them.
transformers installs its output-capturing hooks on the layers the first time hidden states are asked of a model;
from then on this path stands aside for that model and its passes run as before it existed.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from knnssd.engine.fastlayer import (PASSED_KEYWORDS, STEP_ATTRIBUTE, LayerKernels, fast_step, layer_fits,
                                     mask_fits, qualifying_cache, same_code)
from knnssd.engine.kvcache import PreallocatedLayer

PASS_ATTRIBUTE = "_knnssd_pass"  # set on a decoder model that has the fast pass (True)


def decoder_model(model: nn.Module) -> nn.Module | None:
    """The model's Llama decoder model (the module whose forward embeds, runs the layers and the final norm), if its
    forward is Llama's own bytecode; else None."""
    from transformers.models.llama.modeling_llama import LlamaModel

    base = getattr(model, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        return None
    return base if same_code(base, LlamaModel.forward) else None


def install(model: nn.Module) -> bool:
    """Give the model's decoder model the fast pass, where every one of its decoder layers has the fast step;
    whether it got it."""
    base = decoder_model(model)
    if base is None or not len(base.layers) or not all(STEP_ATTRIBUTE in vars(layer) for layer in base.layers):
        return False
    setattr(base, PASS_ATTRIBUTE, True)
    base.forward = types.MethodType(fast_pass, base)
    return True


def installed(model: nn.Module) -> bool:
    """Whether the model's decoder model has the fast pass."""
    return any(PASS_ATTRIBUTE in vars(module) for module in model.modules())


def uninstall(model: nn.Module) -> None:
    """The decoder model back to its class's forward."""
    for module in model.modules():
        if PASS_ATTRIBUTE in vars(module):
            vars(module).pop("forward", None)
            delattr(module, PASS_ATTRIBUTE)


@contextmanager
def layer_by_layer(model: nn.Module) -> Iterator[None]:
    """Within the block the decoder model runs its class's forward, each layer by its own call (the same bits; to
    compare the two, `benchmarks/one_call_ab.py --ways pass`); the fast pass comes back in a ``finally``."""
    had = installed(model)
    uninstall(model)
    try:
        yield
    finally:
        if had:
            install(model)


def _hooked(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks)


def _held_layers(self: nn.Module, rows: int, cache: Any) -> list[tuple[LayerKernels, PreallocatedLayer]] | None:
    """Each decoder layer's (kernels, cache layer) where every layer would take its one call for `rows` rows;
    else None."""
    held = []
    for layer in self.layers[: self.config.num_hidden_layers]:
        kernels = vars(layer).get(STEP_ATTRIBUTE)
        if (kernels is None or getattr(vars(layer).get("forward"), "__func__", None) is not fast_step
                or _hooked(layer) or not layer_fits(layer, kernels, rows)):
            return None
        cached = qualifying_cache(layer, cache, rows)
        if cached is None or not kernels.layer_step_usable(layer):
            return None
        held.append((kernels, cached))
    return held


def _pass_qualifies(self: nn.Module, input_ids: Any, inputs_embeds: Any, cache: Any, kwargs: dict) -> bool:
    config = self.config
    return (inputs_embeds is None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
            and input_ids.shape[0] == 1 and isinstance(cache, DynamicCache) and set(kwargs) <= PASSED_KEYWORDS
            and not self.training and not getattr(config, "output_hidden_states", False)
            and not getattr(config, "output_attentions", False) and getattr(config, "return_dict", True)
            and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                     or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks))


def _run_layers(held: list[tuple[LayerKernels, PreallocatedLayer]], x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (T, hidden) through every layer's `LayerStep` (cos, sin (T, head_dim); mask (T, length + T) or None),
    each cache layer's new entries written in place and shown (`commit`) -> (T, hidden)."""
    rows = x.shape[0]
    for kernels, cached in held:
        start = cached.get_seq_length()
        cached.reserve(start + rows)
        x = kernels.layer_step.step(x, cos, sin, cached.key_buffer, cached.value_buffer, start, mask)
        cached.commit(start + rows)
    return x


def fast_pass(self: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache: Any = None, inputs_embeds: torch.Tensor | None = None,
              use_cache: bool | None = None, **kwargs: Any) -> Any:
    """The decoder model's forward: input_ids (1, T) -> BaseModelOutputWithPast (last_hidden_state (1, T, hidden)),
    every layer's step from one loop where the pass qualifies (the module docstring), else the class's forward."""
    rows = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 0
    held = _held_layers(self, rows, cache) if _pass_qualifies(self, input_ids, inputs_embeds, cache, kwargs) else None
    if held is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    # From here on, LlamaModel.forward's own calls, in its order.
    hidden_states = self.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = (torch.arange(rows, device=hidden_states.device) + cache.get_seq_length()).unsqueeze(0)
    causal_mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                     cache=cache, position_ids=position_ids)
    position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
    if (hidden_states.dtype == torch.float32 and hidden_states.device.type == "cpu"
            and all(mask_fits(causal_mask, rows, cached.get_seq_length()) for _, cached in held)):
        cos, sin = position_embeddings
        mask = causal_mask[0, 0] if causal_mask is not None else None
        hidden = _run_layers(held, hidden_states.reshape(rows, -1), cos[0], sin[0], mask)
        hidden_states = hidden.reshape(1, rows, -1)
    else:  # the class's loop
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask,
                                          position_embeddings=position_embeddings, position_ids=position_ids,
                                          cache=cache, use_cache=use_cache, **kwargs)
    hidden_states = self.norm(hidden_states)
    return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)
