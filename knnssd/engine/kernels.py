"""Faster linear layers for verify passes on CPU, chosen when a model loads.

A verify pass runs every linear layer on k + 1 rows (the last committed token and k drafts). torch's CPU GEMM
(MKL) handles 4-13 rows against a large weight far worse than one row, though each weight is read once either
way and a step is memory-bound: at SmolLM2's shapes, cache-cold, 4-8 rows cost 2-3x one row. Other ways compute
the same product:

    rows         a small C++ kernel (knnssd/engine/csrc/rows_gemm.cpp, AVX-512, built once at first use into the
                 knnssd cache): each weight row is streamed once and multiplied by every input row while it is in
                 registers, so 2-8 rows cost about 1.0-1.3x one row; no extra memory
    packed8      MKL's packed GEMM (`cblas_sgemm_pack`, in torch as `torch.ops.mkl._mkl_reorder_linear_weight` /
                 `_mkl_linear`) on a weight packed once at load for 8 rows, the input padded with zero rows to
                 exactly 8: MKL's kernel for the packed row count streams the weight once for all rows; it costs
                 MKL's packed copy of every weight (about 4x SmolLM2's fp32 size)
    transposed   (W @ x.T).T: the other GEMM layout, about 1.8-2x one row at every row count

The plan, by what this machine has: `rows` for 2-16 rows where the kernel builds (an x86 CPU with AVX-512, a C++
compiler, ninja); else the row-count rule measured in whole verify passes of SmolLM2 on this machine kind
(BENCHMARKS.md section 11): F.linear for 2-3 rows, packed8 for 4-8, transposed for 9-16 (packed8 becomes
transposed without torch's MKL, or past `max_packed_bytes`). Per-call micro-benchmarks at load were tried and
chose worse plans: small products timed alone are noise-dominated and cache-warm. One row (plain decoding) and
longer inputs keep `F.linear`, exactly what transformers computes, and `knnssd.engine.decoding.prefill` suspends the
plan for prompts of any length, so plain decoding stays token-identical to `model.generate`.

Verify passes of grouped-query-attention models also get `knnssd.engine.attention.grouped_sdpa` (query heads folded
onto their key/value heads instead of the cache copied per head, as transformers already does for one token);
it is part of the plan, on the same switch.

On CUDA nothing changes (cuBLAS serves small batches well: v = 1.03 on an H200, BENCHMARKS.md section 7).
`restore(model)` undoes a plan; `load_model(..., fast_kernels=False)` / `--no-fast-kernels` never apply one, and
`transformers_kernels(model)` suspends it, so the two can be compared. `KNNSSD_NO_COMPILE=1` skips the C++ kernel.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from knnssd.engine import attention
from knnssd.engine.kernel_build import compile_error, compiled_kernel

MAX_FAST_ROWS = 16  # verify passes have at most 13 rows at the default draft lengths; longer inputs are prefills
PACK_ROWS = 8  # the row count MKL packs for, and that packed8 pads its input to
COMPILED_ROWS = {rows: "rows" for rows in range(2, MAX_FAST_ROWS + 1)}
LIBRARY_ROWS = {**{rows: "linear" for rows in (2, 3)}, **{rows: "packed8" for rows in range(4, PACK_ROWS + 1)},
                **{rows: "transposed" for rows in range(PACK_ROWS + 1, MAX_FAST_ROWS + 1)}}
MAX_PACKED_BYTES = 8 << 30  # packed copies beyond this total: transposed instead of packed8


@dataclass(frozen=True)
class KernelPlan:
    """What `accelerate` did: the method for each row count 2..MAX_FAST_ROWS, on which device, with how many
    torch threads, the bytes of packed weights it added, why the C++ kernel is not used (if it is not), and
    whether verify passes attend with query heads grouped (`knnssd.engine.attention`)."""

    enabled: bool
    device: str
    threads: int
    rows: tuple[str, ...] = ()
    packed_bytes: int = 0
    reason: str = ""
    grouped_attention: bool = False

    def method(self, rows: int) -> str:
        return self.rows[rows - 2] if self.enabled and 2 <= rows <= MAX_FAST_ROWS else "linear"

    def describe(self) -> str:
        """e.g. 'rows 2-16, grouped attention 2-16', or
        'linear 2-3, packed8 4-8, transposed 9-16 (packed weights 2740 MB; ...)'."""
        if not self.enabled:
            return f"fast kernels off ({self.reason})"
        spans, start = [], 2
        for rows in range(3, MAX_FAST_ROWS + 2):
            if rows > MAX_FAST_ROWS or self.method(rows) != self.method(start):
                spans.append(f"{self.method(start)} {start}" + (f"-{rows - 1}" if rows - 1 > start else ""))
                start = rows
        notes = ([f"packed weights {self.packed_bytes / 1e6:.0f} MB"] if self.packed_bytes else []) + \
            ([self.reason] if self.reason else [])
        attention_note = ", grouped attention 2-16" if self.grouped_attention else ""
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
    rows, weight = x.numel() // x.shape[-1], self.weight
    if rows < 2 or rows > MAX_FAST_ROWS or x.dtype != weight.dtype or not weight.is_contiguous():
        return F.linear(x, weight, self.bias)
    out = self._knnssd_run[rows - 2](x.reshape(rows, x.shape[-1]), weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def accelerate(model: nn.Module, enabled: bool = True, max_packed_bytes: int = MAX_PACKED_BYTES,
               compiled: bool = True) -> KernelPlan:
    """Give every bias-free fp32 linear layer of a CPU model the fastest method for each small row count."""
    parameter = next(model.parameters())
    device, threads = str(parameter.device), torch.get_num_threads()
    if not enabled:
        return KernelPlan(enabled=False, device=device, threads=threads, reason="switched off")
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return KernelPlan(enabled=False, device=device, threads=threads,
                          reason=f"kept for {parameter.device.type} {str(parameter.dtype).removeprefix('torch.')}: "
                                 "only fp32 CPU verify passes need them")
    restore(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None]
    params = list({id(m.weight): m.weight for m in linears}.values())  # a tied weight once
    packs: dict[int, torch.Tensor] = {}
    if compiled and compiled_kernel() is not None and all(p.is_contiguous() for p in params):
        methods = tuple(COMPILED_ROWS[rows] for rows in range(2, MAX_FAST_ROWS + 1))
    else:
        if mkl_packed_available():
            sample = pack(params[0])  # MKL's packed size, per weight element
            estimate = sum(p.numel() for p in params) * sample.numel() / params[0].numel() * sample.element_size()
            if estimate <= max_packed_bytes:
                packs = {id(p): pack(p) for p in params}
        methods = tuple(LIBRARY_ROWS[rows] if LIBRARY_ROWS[rows] != "packed8" or packs else "transposed"
                        for rows in range(2, MAX_FAST_ROWS + 1))
    for linear in linears:
        packed = PackedWeight(linear.weight, packs[id(linear.weight)]) if packs else None
        linear._knnssd_run = tuple(product(method, packed) for method in methods)
        linear.forward = types.MethodType(_fast_forward, linear)
    grouped = attention.uses(model, attention.BASE_IMPLEMENTATION) and any(
        getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    if grouped:
        attention.register()
        attention.set_implementation(model, attention.IMPLEMENTATION)
    return KernelPlan(enabled=True, device=device, threads=threads, rows=methods, reason=compile_error(),
                      packed_bytes=sum(p.numel() * p.element_size() for p in packs.values()),
                      grouped_attention=grouped)


def restore(model: nn.Module) -> None:
    """Every linear layer back to its class's own forward, attention back to SDPA (undoes `accelerate`)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and "forward" in vars(module):
            del module.forward
            del module._knnssd_run
    attention.set_implementation(model, attention.BASE_IMPLEMENTATION)


@contextmanager
def transformers_kernels(model: nn.Module) -> Iterator[None]:
    """Within the block, every linear layer runs transformers' own F.linear and attention transformers' own SDPA
    (for timing transformers' `generate` as it is); the chosen methods come back in a ``finally``."""
    saved = {m: (vars(m)["forward"], m._knnssd_run) for m in model.modules()
             if isinstance(m, nn.Linear) and "forward" in vars(m)}
    grouped = attention.uses(model, attention.IMPLEMENTATION)
    try:
        restore(model)
        yield
    finally:
        for module, (forward, run) in saved.items():
            module.forward, module._knnssd_run = forward, run
        if grouped:
            attention.set_implementation(model, attention.IMPLEMENTATION)
