"""The products and attention of every decoding step on CPU, chosen when a model loads.

Plain decoding multiplies every linear layer by one row; a verify pass by k + 1 rows (the last committed token
and k drafts). A step is memory-bound: each weight is read once either way. With the engine's C++ kernels
(knnssd/engine/csrc/rows_kernels.cpp, AVX-512 or AVX2 with FMA, built once at first use into the knnssd cache)
every width from 1 to MAX_FAST_ROWS runs the same code:

    rows_gemm        each weight row streamed once and multiplied by every input row (1-2 rows: one weight
                     row at a time, a sequential stream; more: register tiles); the bias, where a layer has one,
                     added after
    rows_attention   attention of 1-32 query rows over the KV cache, grouped-query heads on their key/value heads
    rows_rms_norm    the RMSNorm of each row (a decoder's hidden-size norms of Llama's form), one call where
                     transformers' RMSNorm makes a dozen small tensor ops

Before that, `knnssd.engine.weights.place_weights` moves the weights into one arena on huge pages, each layer's
q, k, v and gate, up adjacent, so a step streams them at the memory's speed and multiplies each group in one call.
`knnssd.engine.fastlayer` runs a Llama-shaped decoder layer's step as a dozen calls of these (with
`rows_rope_kv` for the rotary embedding and the cache write) instead of transformers' hundred small tensor ops,
computing the same bits. They are batch-invariant: an output's floating-point operations do not depend on how
many rows the pass has, so a verify row computes the bits the 1-token plain step at that position computes (`KernelPlan.batch_invariant`),
and speculative greedy output is plain decoding's exactly. The prefill (`knnssd.engine.decoding.prefill`) keeps
transformers' own F.linear and SDPA (`transformers_kernels`), for plain decoding and every drafter alike.

Where the kernels cannot run (no AVX-512 or AVX2, no compiler, KNNSSD_NO_COMPILE, another dtype, a GPU), load
says so once (a warning) and the library plan takes over, measured in whole verify passes of SmolLM2 (BENCHMARKS.md
section 11): F.linear for one row and 2-3 rows, MKL's packed GEMM (`packed8`: a weight packed once at load for 8
rows, the input padded to 8, about 4x SmolLM2's fp32 weights in extra memory) for 4-8, (W @ x.T).T for 9-16,
F.linear past 16; grouped-query models attend with `knnssd.engine.attention.grouped_sdpa`. The library's products
round differently at different widths, so greedy output then equals plain decoding's only up to near-ties.

On CUDA nothing changes (cuBLAS serves small batches well: v = 1.03 on an H200, BENCHMARKS.md section 7).
`restore(model)` undoes a plan; `load_model(..., fast_kernels=False)` / `--no-fast-kernels` never apply one, and
`transformers_kernels(model)` suspends it, so the two can be compared.
"""

from __future__ import annotations

import logging
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from knnssd.engine import attention
from knnssd.engine.kernel_build import compile_error, compiled_kernel, vector_isa
from knnssd.engine.weights import Placement, place_weights

LOG = logging.getLogger("knnssd")
MAX_FAST_ROWS = 32  # the widest pass of one request the kernels serve; longer inputs are prefills
MAX_BATCH_ROWS = 256  # the most rows of a batched pass (`knnssd.engine.batch`) one `rows_gemm` call multiplies
_PASS = threading.local()  # .batched: this thread runs a batched pass (`batched_rows`)
PACK_ROWS = 8  # the row count MKL packs for, and that packed8 pads its input to
LIBRARY_MAX_ROWS = 16  # the library plan's small-batch methods stop here (F.linear past it)
COMPILED_ROWS = {rows: "rows" for rows in range(1, MAX_FAST_ROWS + 1)}
LIBRARY_ROWS = {**{rows: "linear" for rows in (1, 2, 3)}, **{rows: "packed8" for rows in range(4, PACK_ROWS + 1)},
                **{rows: "transposed" for rows in range(PACK_ROWS + 1, LIBRARY_MAX_ROWS + 1)},
                **{rows: "linear" for rows in range(LIBRARY_MAX_ROWS + 1, MAX_FAST_ROWS + 1)}}
MAX_PACKED_BYTES = 8 << 30  # packed copies beyond this total: transposed instead of packed8


@dataclass(frozen=True)
class KernelPlan:
    """What `accelerate` did: the method for each row count 1..MAX_FAST_ROWS, on which device, with how many
    torch threads, the bytes of packed weights it added, why the C++ kernels are not used (if they are not),
    whether steps attend with the kernels' `rows_attention` ("rows") or with query heads grouped by the library
    path ("grouped", `knnssd.engine.attention`) or as transformers does (""), and the vector instruction set the
    kernels were built for, and where the weights were placed (`knnssd.engine.weights.Placement.describe`, or ""
    where they stayed). `batch_invariant`: a verify row computes the bits of the plain step at its position."""

    enabled: bool
    device: str
    threads: int
    rows: tuple[str, ...] = ()
    packed_bytes: int = 0
    reason: str = ""
    attention: str = ""
    isa: str = ""
    weights: str = ""

    @property
    def batch_invariant(self) -> bool:
        return self.enabled and self.attention == "rows" and set(self.rows) == {"rows"}

    def method(self, rows: int) -> str:
        return self.rows[rows - 1] if self.enabled and 1 <= rows <= MAX_FAST_ROWS else "linear"

    def describe(self) -> str:
        """e.g. 'rows 1-32, attention rows 1-32 (avx2, batch-invariant)', or
        'linear 1-3, packed8 4-8, transposed 9-16, linear 17-32, grouped attention 2-16 (packed weights 2740 MB;
        ...)'."""
        if not self.enabled:
            return f"fast kernels off ({self.reason})"
        spans, start = [], 1
        for rows in range(2, MAX_FAST_ROWS + 2):
            if rows > MAX_FAST_ROWS or self.method(rows) != self.method(start):
                spans.append(f"{self.method(start)} {start}" + (f"-{rows - 1}" if rows - 1 > start else ""))
                start = rows
        notes = ([f"{self.isa}, batch-invariant"] if self.batch_invariant else []) + \
            ([self.weights] if self.weights else []) + \
            ([f"packed weights {self.packed_bytes / 1e6:.0f} MB"] if self.packed_bytes else []) + \
            ([self.reason] if self.reason else [])
        attention_note = {"rows": f", attention rows 1-{MAX_FAST_ROWS}",
                          "grouped": f", grouped attention 2-{attention.MAX_GROUPED_QUERIES}"}.get(self.attention, "")
        return ", ".join(spans) + attention_note + (f" ({'; '.join(notes)})" if notes else "")


def mkl_packed_available() -> bool:
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """MKL's packed copy of `weight` (out, in) for PACK_ROWS-row products."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)


class PackedWeight:
    """MKL's packed copy of one weight that follows the weight: packed again at the first use after the weight
    changed (`load_state_dict` copies in place, `assign=True` puts a new tensor, any in-place edit), so the
    library path never multiplies by stale values. A change is seen by the weight's storage, shape and
    version counter."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor | None = None) -> None:
        self._key = _weight_key(weight) if packed is not None else None
        self._packed = packed

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        key = _weight_key(weight)
        if key != self._key:
            self._packed, self._key = pack(weight), key
        return self._packed


def _weight_key(weight: torch.Tensor) -> tuple:
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter (and cannot change outside it)
        version = None
    return weight.data_ptr(), tuple(weight.shape), version


Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (rows, in), weight (out, in)) -> (rows, out)


def product(method: str, packed: PackedWeight | None = None) -> Product:
    """A function (x, weight) -> x @ weight.T by `method`; the weight is passed at each call (never captured),
    so a model whose weights are replaced or loaded again computes with its current ones."""
    if method == "linear":
        return F.linear
    if method == "transposed":
        return lambda x, weight: (weight @ x.T).T
    if method == "rows":
        return compiled_kernel().rows_gemm
    if packed is None:
        raise ValueError("packed8 needs a PackedWeight")

    def packed8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = x if rows == PACK_ROWS else torch.cat([x, x.new_zeros(PACK_ROWS - rows, x.shape[1])])
        return torch.ops.mkl._mkl_linear(padded, packed.of(weight), weight, None, PACK_ROWS)[:rows]
    return packed8


def runner(method: str, weight: torch.Tensor, packed: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x (rows, in) -> x @ weight.T (rows, out) by `method` (`packed`: `pack(weight)` for packed8)."""
    run = product(method, PackedWeight(weight, packed) if packed is not None else None)
    return lambda x: run(x, weight)


def _fast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> (..., out). 1-MAX_FAST_ROWS rows by the plan's method for that row count; within
    `batched_rows`, MAX_FAST_ROWS + 1 to MAX_BATCH_ROWS rows by the compiled kernel (the same per-row arithmetic,
    so each request's rows keep their bits), or F.linear under the library plan; anything else (a prefill)
    F.linear."""
    rows, weight = x.numel() // x.shape[-1], self.weight
    if x.dtype != weight.dtype or not weight.is_contiguous():
        return F.linear(x, weight, self.bias)
    if 1 <= rows <= MAX_FAST_ROWS:
        run = self._knnssd_run[rows - 1]
    elif MAX_FAST_ROWS < rows <= MAX_BATCH_ROWS and self._knnssd_wide and getattr(_PASS, "batched", False):
        run = self._knnssd_run[-1]
    else:
        return F.linear(x, weight, self.bias)
    out = run(x.reshape(rows, x.shape[-1]), weight)
    if self.bias is not None:  # an exact elementwise add after the product: the same bits for every row count
        out = out + self.bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _fast_rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (..., hidden) -> (..., hidden): the same rows as `_fast_forward` takes (1-MAX_FAST_ROWS, or up to
    MAX_BATCH_ROWS within `batched_rows`) by the kernel's `rows_rms_norm`; anything else by the class's forward."""
    rows, weight = x.numel() // x.shape[-1], self.weight
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and (1 <= rows <= MAX_FAST_ROWS or (rows <= MAX_BATCH_ROWS and getattr(_PASS, "batched", False)))):
        return self._knnssd_norm(x.reshape(rows, x.shape[-1]), weight, self.variance_epsilon).reshape(x.shape)
    return type(self).forward(self, x)


def llama_rms_norms(model: nn.Module) -> list[nn.Module]:
    """The model's hidden-size RMSNorms whose forward is Llama's own (Qwen2's and Mistral's are copies of it:
    the same bytecode), which `rows_rms_norm` computes: w * (x * rsqrt(mean(x^2) + eps)). Other norms (Gemma's
    1 + w, per-head norms) keep theirs."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    reference = LlamaRMSNorm.forward.__code__
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    found = []
    for module in model.modules():
        code = getattr(getattr(type(module), "forward", None), "__code__", None)
        weight = getattr(module, "weight", None)
        if (code is not None and code.co_code == reference.co_code and code.co_names == reference.co_names
                and isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.shape[0] == hidden
                and isinstance(getattr(module, "variance_epsilon", None), float)):
            found.append(module)
    return found


@contextmanager
def batched_rows() -> Iterator[None]:
    """Within the block (in this thread), a linear layer of the compiled plan multiplies more than MAX_FAST_ROWS
    rows (up to MAX_BATCH_ROWS: a batched pass of many requests) with `rows_gemm`, so that every request's rows
    compute the bits they compute alone. Outside it, such inputs are prefills and keep F.linear."""
    previous = getattr(_PASS, "batched", False)
    _PASS.batched = True
    try:
        yield
    finally:
        _PASS.batched = previous


def accelerate(model: nn.Module, enabled: bool = True, max_packed_bytes: int = MAX_PACKED_BYTES,
               compiled: bool = True, place: bool = True) -> KernelPlan:
    """Give every fp32 linear layer of a CPU model the fastest method for each row count 1..MAX_FAST_ROWS and its
    attention the kernels' `rows_attention` (the library plan: bias-free layers only, grouped attention). With the
    compiled kernels and `place`, the weights first move to huge pages, each layer's q, k, v and gate, up
    adjacent (`knnssd.engine.weights`), so a step streams them as fast as the memory allows."""
    parameter = next(model.parameters())
    device, threads = str(parameter.device), torch.get_num_threads()
    if not enabled:
        return KernelPlan(enabled=False, device=device, threads=threads, reason="switched off")
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        plan = KernelPlan(enabled=False, device=device, threads=threads,
                          reason=f"kept for {parameter.device.type} {str(parameter.dtype).removeprefix('torch.')}: "
                                 "the engine's kernels serve fp32 on CPU")
        LOG.warning("knnssd: %s; plain steps and verify passes use the library's products, so greedy output equals "
                    "plain decoding's up to near-ties", plan.describe())
        return plan
    restore(model)
    kernel = compiled_kernel() if compiled else None
    every = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if kernel is not None and all(m.weight.is_contiguous() for m in every):
        from knnssd.engine import fastlayer, fastpass  # they import this module

        placement = _placed(model, fastlayer.joinable_groups(model)) if place else None
        methods = tuple(COMPILED_ROWS[rows] for rows in range(1, MAX_FAST_ROWS + 1))
        for linear in every:
            linear._knnssd_run = tuple(product(method) for method in methods)
            linear._knnssd_wide = True  # rows_gemm takes a batched pass's rows too (up to MAX_BATCH_ROWS)
            linear.forward = types.MethodType(_fast_forward, linear)
        for norm in llama_rms_norms(model):
            norm._knnssd_norm = kernel.rows_rms_norm
            norm.forward = types.MethodType(_fast_rms_norm, norm)
        rows_attention = attention.use_rows_kernel(model, kernel.rows_attention)
        if rows_attention:
            fastlayer.install(model, kernel)
            fastpass.install(model)
        return KernelPlan(enabled=True, device=device, threads=threads, rows=methods,
                          attention="rows" if rows_attention else "", isa=vector_isa(),
                          weights=placement.describe() if placement else "")
    linears = [m for m in every if m.bias is None]
    params = list({id(m.weight): m.weight for m in linears}.values())  # a tied weight once
    packs: dict[int, torch.Tensor] = {}
    if mkl_packed_available():
        sample = pack(params[0])  # MKL's packed size, per weight element
        estimate = sum(p.numel() for p in params) * sample.numel() / params[0].numel() * sample.element_size()
        if estimate <= max_packed_bytes:
            packs = {id(p): pack(p) for p in params}
    methods = tuple(LIBRARY_ROWS[rows] if LIBRARY_ROWS[rows] != "packed8" or packs else "transposed"
                    for rows in range(1, MAX_FAST_ROWS + 1))
    for linear in linears:
        packed = PackedWeight(linear.weight, packs[id(linear.weight)]) if packs else None
        linear._knnssd_run = tuple(product(method, packed) for method in methods)
        linear._knnssd_wide = False  # past MAX_FAST_ROWS: F.linear
        linear.forward = types.MethodType(_fast_forward, linear)
    grouped = attention.uses(model, attention.BASE_IMPLEMENTATION) and any(
        getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    if grouped:
        attention.register()
        attention.set_implementation(model, attention.IMPLEMENTATION)
    return KernelPlan(enabled=True, device=device, threads=threads, rows=methods,
                      reason=compile_error() if compiled else "C++ kernels not asked for",
                      packed_bytes=sum(p.numel() * p.element_size() for p in packs.values()),
                      attention="grouped" if grouped else "")


def _placed(model: nn.Module, groups: list[list[nn.Parameter]]) -> Placement:
    """`place_weights` once per model: a model accelerated again keeps its arena while no parameter has moved."""
    addresses = tuple(p.data_ptr() for p in model.parameters())
    previous = vars(model).get("_knnssd_placement")
    if previous is not None and previous[0] == addresses:
        return previous[1]
    placement = place_weights(model, groups)
    vars(model)["_knnssd_placement"] = (tuple(p.data_ptr() for p in model.parameters()), placement)
    return placement


def restore(model: nn.Module) -> None:
    """Every linear layer and norm back to its class's own forward, attention back to SDPA (undoes
    `accelerate`; the weights stay in the arena it placed them in, with the same values)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and "forward" in vars(module):
            del module.forward
            del module._knnssd_run
            vars(module).pop("_knnssd_wide", None)
        elif "_knnssd_norm" in vars(module):
            vars(module).pop("forward", None)
            del module._knnssd_norm
    attention.set_implementation(model, attention.BASE_IMPLEMENTATION)
    attention.use_rows_kernel(model, None)
    from knnssd.engine import fastlayer, fastpass  # they import this module

    fastpass.uninstall(model)
    fastlayer.uninstall(model)


@contextmanager
def transformers_kernels(model: nn.Module) -> Iterator[None]:
    """Within the block, every linear layer runs transformers' own F.linear, every norm its own forward and
    attention transformers' own SDPA (for timing transformers' `generate` as it is); the chosen methods come back in a ``finally``."""
    saved = {m: (vars(m)["forward"], m._knnssd_run, m._knnssd_wide) for m in model.modules()
             if isinstance(m, nn.Linear) and "forward" in vars(m)}
    norms = {m: (vars(m)["forward"], m._knnssd_norm) for m in model.modules() if "_knnssd_norm" in vars(m)}
    from knnssd.engine import fastlayer, fastpass  # they import this module

    steps = fastlayer.saved_steps(model)
    had_pass = fastpass.installed(model)
    grouped = attention.uses(model, attention.IMPLEMENTATION)
    rows_kernel = attention.rows_kernel_of(model)
    try:
        restore(model)
        yield
    finally:
        for module, (forward, run, wide) in saved.items():
            module.forward, module._knnssd_run, module._knnssd_wide = forward, run, wide
        for module, (forward, norm) in norms.items():
            module.forward, module._knnssd_norm = forward, norm
        fastlayer.restore_steps(steps)
        if had_pass:
            fastpass.install(model)
        if grouped:
            attention.set_implementation(model, attention.IMPLEMENTATION)
        attention.use_rows_kernel(model, rows_kernel)
