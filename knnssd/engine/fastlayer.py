"""A decoder layer's decoding step in a dozen kernel calls (CPU fp32, the engine's compiled kernels).

transformers' Llama decoder layer makes about a hundred small tensor ops a step (views, transposes, the rotary
embedding's slices and concatenations, the cache's slices, residual adds, two norms); on a 2-core CPU they cost a
third of a SmolLM2 step. `fast_step` computes the same step with the same kernels and the same elementwise
arithmetic, so every output bit is the library path's (tests/test_fastlayer.py compares the two) wherever the
MLP's intermediate size is a multiple of the vector width (every real model). Otherwise the library path's
activation is not batch-invariant over a flat (T, intermediate) buffer and the fast path's, row by row on the
joined product's column slices, is (tests/test_fastlayer.py, intermediate size 100):

    rows_rms_norm -> q, k, v product -> rows_rope_kv (rotary queries and keys; keys and values written into the
    preallocated cache) -> rows_attention -> o product + residual -> rows_rms_norm -> gate, up product ->
    act(gate) * up -> down product + residual

Where the layer's q, k, v and gate, up are joined (`weights.joined`) and its activation is a plain SiLU, the
kernels' `LayerStep` makes these calls from C++ in one call (the same tensors, the same order, so the same bits;
1.5-2.1 ms of a SmolLM2 plain step saved at context 200, BENCHMARKS.md section 42), after
`LayerKernels.layer_step_usable` has checked that what it holds is still the layer's. Other activations run one
row at a time (`_activated`).

A step takes this path where it qualifies: one request of 1-MAX_FAST_ROWS rows, its own `PreallocatedLayer`
already holding the prompt, no batched plan, attention and MLP in place (not skipped while drafting), a bool or
absent mask, fp32 on CPU. Anything else (a prefill, a batched pass, a layer-skip draft, a sliding-window cache)
runs the class's own forward. `install` gives the path to the layers whose decoder-layer, attention and MLP
forwards are Llama's own bytecode (Qwen2's full-attention layers too) and whose norms the kernels compute
(`kernels.llama_rms_norms`); other families (Mistral's sliding window among them) keep transformers' forward.
Where a whole pass qualifies, `knnssd.engine.fastpass` calls the layers' `LayerStep`s from one loop instead of
each layer's module call (the same steps).
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers import DynamicCache
from transformers.activations import SiLUActivation

from knnssd.engine import attention
from knnssd.engine.kernels import MAX_FAST_ROWS, llama_rms_norms
from knnssd.engine.kvcache import PreallocatedLayer
from knnssd.engine.weights import Joined, joined

STEP_ATTRIBUTE = "_knnssd_step"  # set on each decoder layer that has the fast path: its `LayerKernels`
PASSED_KEYWORDS = frozenset({"cache_position"})  # keywords a qualifying step may carry (and the path ignores)


@dataclass(frozen=True)
class Holds:
    """What a `LayerStep` holds and where the layer keeps each: the i-th object is `slots[i][names[i]]`, with
    `slots[i]` a module's `_modules` or `_parameters` dict (an absent bias is held as None). `tensors` are the
    held parameters, with their addresses and shapes then. `current()`: the layer still keeps these very objects
    there, with that data; C-level maps, as it runs before every layer's step."""

    slots: tuple[dict, ...] = ()
    names: tuple[str, ...] = ()
    values: tuple[Any, ...] = ()
    tensors: tuple[torch.Tensor, ...] = ()
    addresses: tuple[int, ...] = ()
    shapes: tuple[torch.Size, ...] = ()

    def current(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.slots, self.names), self.values))
                and all(map(operator.eq, map(torch.Tensor.data_ptr, self.tensors), self.addresses))
                and all(map(operator.eq, map(_SHAPE, self.tensors), self.shapes)))


_SHAPE = operator.attrgetter("shape")


def _holds(places: list[tuple[dict, str]]) -> Holds:
    """`Holds` of what each (dict, name) place keeps now."""
    values = tuple(slots.get(name) for slots, name in places)
    tensors = tuple(value for value in values if isinstance(value, torch.Tensor))
    return Holds(slots=tuple(slots for slots, _ in places), names=tuple(name for _, name in places), values=values,
                 tensors=tensors, addresses=tuple(t.data_ptr() for t in tensors),
                 shapes=tuple(t.shape for t in tensors))


class LayerKernels:
    """What a layer's fast step calls: the compiled kernel module, the classes its sub-layers must still be, its
    q, k, v and its gate, up weights joined into one matrix each where they lie adjacent (`weights.joined`), and
    where those joins exist and the MLP's activation is SiLU, the kernels' `LayerStep` (`layer_step`): the whole
    step in one call, holding the layer's sub-modules' weights (`holds`, checked before every step)."""

    def __init__(self, kernel: Any, attention_class: type, mlp_class: type, qkv: Joined | None = None,
                 gate_up: Joined | None = None, layer_step: Any = None, holds: Holds = Holds()) -> None:
        self.kernel = kernel
        self.attention_class = attention_class
        self.mlp_class = mlp_class
        self.qkv = qkv
        self.gate_up = gate_up
        self.layer_step = layer_step
        self.holds = holds

    def layer_step_usable(self, layer: nn.Module) -> bool:
        """Whether `layer_step` still computes `layer`'s step: the same sub-modules, each parameter the same object
        with the same address and shape, the same attention scaling and norm epsilons, and a plain SiLU. Anything
        else (a sub-module swapped, a parameter replaced or given new data, a hook on the activation) sends the
        step to the calls one by one, which read the layer afresh."""
        step = self.layer_step
        return (step is not None and self.holds.current()
                and float(layer.self_attn.scaling) == step.scale
                and float(layer.input_layernorm.variance_epsilon) == step.input_eps
                and float(layer.post_attention_layernorm.variance_epsilon) == step.post_eps
                and _plain_silu(layer.mlp.act_fn))


def _code(function: Any) -> Any:
    return getattr(inspect.unwrap(function), "__code__", None)


def _same_function(function: Any, reference: Any) -> bool:
    mine, theirs = _code(function), _code(reference)
    return mine is not None and mine.co_code == theirs.co_code and mine.co_names == theirs.co_names


def same_code(module: nn.Module, reference: Any) -> bool:
    return _same_function(getattr(type(module), "forward", None), reference)


def _plain_attention(attn: nn.Module | None) -> bool:
    """Llama's attention forward, or Qwen2's (Llama's with a sliding-window argument) on a full-attention layer."""
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return attn is not None and (same_code(attn, LlamaAttention.forward) or (
        same_code(attn, Qwen2Attention.forward) and getattr(attn, "sliding_window", None) is None))


def eligible_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers whose forwards are Llama's own (Llama, Qwen2's full-attention layers: copies of it) and
    whose two norms the kernels compute."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

    norms = {id(norm) for norm in llama_rms_norms(model)}
    return [layer for layer in model.modules()
            if same_code(layer, LlamaDecoderLayer.forward)
            and _plain_attention(getattr(layer, "self_attn", None))
            and same_code(getattr(layer, "mlp", None), LlamaMLP.forward)
            and id(getattr(layer, "input_layernorm", None)) in norms
            and id(getattr(layer, "post_attention_layernorm", None)) in norms
            and all(linear.weight.is_contiguous() for linear in layer.modules() if isinstance(linear, nn.Linear))]


def _projections(layer: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear]]:
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]


def joinable_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Per eligible layer, [q, k, v] and [gate, up] weights: each group multiplies the same input, so
    `weights.place_weights` lays it out as one matrix."""
    return [[linear.weight for linear in group] for layer in eligible_layers(model)
            for group in _projections(layer)]


def _silu_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """transformers' `SiLUActivation.forward`, as its source reads; compared by bytecode (`same_code`), so a
    class whose forward was replaced (a hub kernel) does not count as SiLU."""
    return nn.functional.silu(input)


@functools.lru_cache(maxsize=None)
def _silu_class_forward(forward: Any) -> bool:
    """Whether `forward` (a SiLUActivation class's forward as it is now) has `_silu_forward`'s bytecode; cached per
    function object, since `_plain_silu` runs before every layer's step."""
    return _same_function(forward, _silu_forward)


def _plain_silu(act: Any) -> bool:
    """Whether the MLP's activation computes `F.silu` and nothing more when called (no instance forward, no hooks),
    which `LayerStep` calls in its place."""
    if type(act) is nn.SiLU:
        if act.inplace:
            return False
    elif type(act) is not SiLUActivation or not _silu_class_forward(type(act).forward):
        return False
    return ("forward" not in vars(act) and not act._forward_hooks and not act._forward_pre_hooks
            and not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks)


def _layer_step(kernel: Any, layer: nn.Module, qkv: Joined | None, gate_up: Joined | None
                ) -> tuple[Any, Holds]:
    """The kernels' `LayerStep` for `layer` and what it holds, or (None, Holds()) where the layer's q, k, v or
    gate, up are not joined, its activation is not a plain SiLU, or the kernel build has no `LayerStep`."""
    attn, mlp = layer.self_attn, layer.mlp
    if qkv is None or gate_up is None or not hasattr(kernel, "LayerStep") or not _plain_silu(mlp.act_fn):
        return None, Holds()
    qkv_linears, gate_up_linears = _projections(layer)
    linears = qkv_linears + [attn.o_proj] + gate_up_linears + [mlp.down_proj]
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    modules = [(layer, name) for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")] + \
        [(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    parameters = [(m, n) for m in linears for n in ("weight", "bias")] + [(m, "weight") for m in norms]
    holds = _holds([(owner._modules, name) for owner, name in modules] +
                   [(owner._parameters, name) for owner, name in parameters])

    def bias(linear: nn.Linear) -> torch.Tensor | None:
        return None if linear.bias is None else linear.bias.detach()

    step = kernel.LayerStep(
        input_norm=layer.input_layernorm.weight.detach(), input_eps=float(layer.input_layernorm.variance_epsilon),
        qkv=qkv.matrix, qkv_sizes=list(qkv.sizes), qkv_biases=[bias(linear) for linear in qkv_linears],
        scale=float(attn.scaling), o=attn.o_proj.weight.detach(), o_bias=bias(attn.o_proj),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        post_eps=float(layer.post_attention_layernorm.variance_epsilon), gate_up=gate_up.matrix,
        gate_up_sizes=list(gate_up.sizes), gate_up_biases=[bias(linear) for linear in gate_up_linears],
        down=mlp.down_proj.weight.detach(), down_bias=bias(mlp.down_proj))
    return step, holds


def install(model: nn.Module, kernel: Any) -> int:
    """Give every eligible decoder layer of `model` the fast step; how many got it."""
    layers = eligible_layers(model)
    for layer in layers:
        qkv, gate_up = (joined([linear.weight for linear in group]) for group in _projections(layer))
        layer_step, holds = _layer_step(kernel, layer, qkv, gate_up)
        setattr(layer, STEP_ATTRIBUTE, LayerKernels(kernel, type(layer.self_attn), type(layer.mlp), qkv, gate_up,
                                                    layer_step, holds))
        layer.forward = types.MethodType(fast_step, layer)
    return len(layers)


def uninstall(model: nn.Module) -> None:
    """Every decoder layer back to its class's forward."""
    for module in model.modules():
        if STEP_ATTRIBUTE in vars(module):
            vars(module).pop("forward", None)
            delattr(module, STEP_ATTRIBUTE)


def saved_steps(model: nn.Module) -> dict[nn.Module, tuple[Any, LayerKernels]]:
    """The installed fast steps (layer -> (forward, kernels)), for `restore_steps` after a block without them."""
    return {m: (vars(m)["forward"], vars(m)[STEP_ATTRIBUTE]) for m in model.modules() if STEP_ATTRIBUTE in vars(m)}


def restore_steps(saved: dict[nn.Module, tuple[Any, LayerKernels]]) -> None:
    for layer, (forward, kernels) in saved.items():
        layer.forward = forward
        setattr(layer, STEP_ATTRIBUTE, kernels)


@contextmanager
def calls_one_by_one(model: nn.Module) -> Iterator[None]:
    """Within the block every fast step makes its kernel calls one by one from Python, not in one `LayerStep`
    call (the same bits; to compare the two, `benchmarks/one_call_ab.py`)."""
    steps = [vars(m)[STEP_ATTRIBUTE] for m in model.modules() if STEP_ATTRIBUTE in vars(m)]
    saved = [step.layer_step for step in steps]
    try:
        for step in steps:
            step.layer_step = None
        yield
    finally:
        for step, layer_step in zip(steps, saved):
            step.layer_step = layer_step


def _product(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x (T, in) -> (T, out) exactly as the layer's accelerated forward computes it (`kernels._fast_forward`); a
    linear put in after the kernels were installed (no `_knnssd_run`) by its own forward, as the class would."""
    if "_knnssd_run" not in vars(linear):
        return linear(x)
    out = linear._knnssd_run[x.shape[0] - 1](x, linear.weight)
    return out if linear.bias is None else out + linear.bias


def _products(kernel: Any, linears: list[nn.Linear], join: Joined | None, x: torch.Tensor) -> list[torch.Tensor]:
    """x (T, in) -> [(T, out_i)] for linears that share the input: one `rows_gemm` over their joined weights where
    they are still joined, the columns split after (each output's bits are the separate products'), else one
    product each."""
    if join is None or not join.current([linear.weight for linear in linears]):
        return [_product(linear, x) for linear in linears]
    outs = kernel.rows_gemm(x, join.matrix).split(join.sizes, dim=1)
    return [out if linear.bias is None else out + linear.bias for out, linear in zip(outs, linears)]


def _activated(act: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    """act(gate) for gate (T, I), a column slice of the joined gate/up product, each row computing the bits a 1-row
    step computes. A plain SiLU in one call (ATen takes a strided slice row by row: tests/test_fastlayer.py,
    intermediate size 100); any other activation one row at a time, since some take another path over strided rows
    (exact GELU: its 9-row result differed from its rows alone, found on 2026-12-05)."""
    if gate.shape[0] == 1 or _plain_silu(act):
        return act(gate)
    return torch.cat([act(gate[t:t + 1]) for t in range(gate.shape[0])])


def qualifying_cache(layer: nn.Module, cache: Any, rows: int) -> PreallocatedLayer | None:
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        return None
    index = getattr(layer.self_attn, "layer_idx", None)
    held = cache.layers[index] if index is not None and index < len(cache.layers) else None
    if (type(held) is not PreallocatedLayer or not held.is_initialized or held.key_buffer is None
            or held.keys.shape[0] != 1 or held.get_seq_length() == 0):
        return None
    return held


def layer_fits(layer: nn.Module, kernels: LayerKernels, rows: int) -> bool:
    """Whether `layer` can take the fast path for a `rows`-row step: in eval mode, its attention and MLP the classes
    the path was installed for (not skipped while drafting), the rows kernel installed on its attention and the
    config naming the engine's attention implementation."""
    attn, mlp = layer.self_attn, layer.mlp
    return (1 <= rows <= MAX_FAST_ROWS and not layer.training
            and type(attn) is kernels.attention_class and type(mlp) is kernels.mlp_class
            and vars(attn).get(attention.KERNEL_ATTRIBUTE) is not None
            and attention.uses(attn, attention.IMPLEMENTATION))


def mask_fits(mask: torch.Tensor | None, rows: int, length: int) -> bool:
    """Whether the kernels take `mask` for `rows` rows over `length` cached entries: absent (causal), or bool
    (1, 1, rows, length + rows)."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4
                            and tuple(mask.shape) == (1, 1, rows, length + rows))


def fast_step(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = False,
              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
    """The decoder layer's forward: hidden_states (1, T, hidden) -> (1, T, hidden), by the kernels where the step
    qualifies (see the module docstring), else by the class's forward with the same arguments."""
    kernels: LayerKernels = vars(self)[STEP_ATTRIBUTE]
    rows = hidden_states.shape[1] if hidden_states.dim() == 3 else 0
    held = None
    if (hidden_states.dim() == 3 and hidden_states.shape[0] == 1 and set(kwargs) <= PASSED_KEYWORDS
            and position_embeddings is not None and hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu" and layer_fits(self, kernels, rows)):
        held = qualifying_cache(self, cache, rows)
    if held is not None and not mask_fits(attention_mask, rows, held.get_seq_length()):
        held = None
    if held is None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                  **kwargs)
    hidden = hidden_states.shape[-1]
    x = hidden_states.reshape(rows, hidden)
    start = held.get_seq_length()
    end = start + rows
    held.reserve(end)
    cos, sin = position_embeddings
    mask = attention_mask[0, 0] if attention_mask is not None else None
    if kernels.layer_step_usable(self):
        x = kernels.layer_step.step(x, cos[0], sin[0], held.key_buffer, held.value_buffer, start, mask)
        held.commit(end)
        return x.reshape(1, rows, hidden)
    attn, mlp, kernel = self.self_attn, self.mlp, kernels.kernel
    rows_attention = vars(attn)[attention.KERNEL_ATTRIBUTE]
    norm = self.input_layernorm
    h = kernel.rows_rms_norm(x, norm.weight, norm.variance_epsilon)
    q, k, v = _products(kernel, [attn.q_proj, attn.k_proj, attn.v_proj], kernels.qkv, h)
    query = kernel.rows_rope_kv(q, k, v, cos[0], sin[0], held.key_buffer, held.value_buffer, start)  # (T, H, D)
    held.commit(end)
    out = rows_attention(query, held.keys[0], held.values[0], mask, float(attn.scaling))  # (T, H, D)
    x = x + _product(attn.o_proj, out.reshape(rows, -1))
    norm = self.post_attention_layernorm
    h = kernel.rows_rms_norm(x, norm.weight, norm.variance_epsilon)
    gate, up = _products(kernel, [mlp.gate_proj, mlp.up_proj], kernels.gate_up, h)
    x = x + _product(mlp.down_proj, _activated(mlp.act_fn, gate) * up)
    return x.reshape(1, rows, hidden)
