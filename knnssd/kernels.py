"""Faster linear layers for verify passes on CPU, chosen when a model loads.

A verify pass runs every linear layer on k + 1 rows (the last committed token and k drafts). torch's CPU GEMM
(MKL) handles 4-13 rows against a large weight far worse than one row, though each weight is read once either
way and a step is memory-bound: at SmolLM2's shapes, cache-cold, 4-8 rows cost 2-3x one row. Two other ways
compute the same product:

    transposed   (W @ x.T).T: the other GEMM layout; about 1.8-2x one row at every row count
    packed8      MKL's packed GEMM (`cblas_sgemm_pack`, in torch as `torch.ops.mkl._mkl_reorder_linear_weight` /
                 `_mkl_linear`) on a weight packed once at load for 8 rows, the input padded with zero rows to
                 exactly 8: MKL's kernel for the packed row count streams the weight once for all rows (other
                 row counts fall off it, so the padding)

Measured in whole verify passes of SmolLM2 on this machine kind (BENCHMARKS.md section 11, benchmarks/
step_cost.py), the fastest by row count is ROW_METHODS: plain F.linear for 2-3 rows, packed8 for 4-8, transposed
for 9-16. Per-call micro-benchmarks at load were tried first and chose worse: small products timed alone are
noise-dominated and cache-warm. One row (plain decoding) and longer inputs (prefills) keep `F.linear`, exactly
what transformers computes, so plain decoding stays token-identical to `model.generate`.

Chosen per device at load: on CUDA nothing changes (cuBLAS serves small batches well: v = 1.03 on an H200,
BENCHMARKS.md section 7); on a CPU without torch's MKL, packed8 becomes transposed. packed8 costs memory, MKL's
packed copy of each weight (about 4x the model's fp32 size for SmolLM2); past `max_packed_bytes` the plan uses
transposed instead. `restore(model)` undoes it; `load_model(..., fast_kernels=False)` / `--no-fast-kernels` never
apply it, and `transformers_kernels(model)` suspends it, so the two can be compared.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_FAST_ROWS = 16  # verify passes have at most 13 rows at the default draft lengths; longer inputs are prefills
PACK_ROWS = 8  # the row count MKL packs for, and that packed8 pads its input to
ROW_METHODS = {**{rows: "linear" for rows in (2, 3)}, **{rows: "packed8" for rows in range(4, PACK_ROWS + 1)},
               **{rows: "transposed" for rows in range(PACK_ROWS + 1, MAX_FAST_ROWS + 1)}}
MAX_PACKED_BYTES = 8 << 30  # packed copies beyond this total: transposed instead of packed8


@dataclass(frozen=True)
class KernelPlan:
    """What `accelerate` did: the method for each row count 2..MAX_FAST_ROWS, on which device, with how many
    torch threads, and the bytes of packed weights it added."""

    enabled: bool
    device: str
    threads: int
    rows: tuple[str, ...] = ()
    packed_bytes: int = 0
    reason: str = ""

    def method(self, rows: int) -> str:
        return self.rows[rows - 2] if self.enabled and 2 <= rows <= MAX_FAST_ROWS else "linear"

    def describe(self) -> str:
        """e.g. 'linear 2-3, packed8 4-8, transposed 9-16 (packed weights 2186 MB)'."""
        if not self.enabled:
            return f"fast kernels off ({self.reason})"
        spans, start = [], 2
        for rows in range(3, MAX_FAST_ROWS + 2):
            if rows > MAX_FAST_ROWS or self.method(rows) != self.method(start):
                spans.append(f"{self.method(start)} {start}" + (f"-{rows - 1}" if rows - 1 > start else ""))
                start = rows
        return ", ".join(spans) + f" (packed weights {self.packed_bytes / 1e6:.0f} MB)"


def mkl_packed_available() -> bool:
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """MKL's packed copy of `weight` (out, in) for PACK_ROWS-row products."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)


def runner(method: str, weight: torch.Tensor, packed: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x (rows, in) -> x @ weight.T (rows, out) by `method`."""
    if method == "linear":
        return lambda x: F.linear(x, weight)
    if method == "transposed":
        return lambda x: (weight @ x.T).T
    if packed is None:
        raise ValueError("packed8 needs a packed weight")

    def packed8(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = x if rows == PACK_ROWS else torch.cat([x, x.new_zeros(PACK_ROWS - rows, x.shape[1])])
        return torch.ops.mkl._mkl_linear(padded, packed, weight, None, PACK_ROWS)[:rows]
    return packed8


def _fast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows < 2 or rows > MAX_FAST_ROWS or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    out = self._knnssd_run[rows - 2](x.reshape(rows, x.shape[-1]))
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


def accelerate(model: nn.Module, enabled: bool = True, max_packed_bytes: int = MAX_PACKED_BYTES) -> KernelPlan:
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
    if mkl_packed_available():
        sample = pack(params[0])  # MKL's packed size, per weight element
        estimate = sum(p.numel() for p in params) * sample.numel() / params[0].numel() * sample.element_size()
        if estimate <= max_packed_bytes:
            packs = {id(p): pack(p) for p in params}
    methods = tuple(ROW_METHODS[rows] if ROW_METHODS[rows] != "packed8" or packs else "transposed"
                    for rows in range(2, MAX_FAST_ROWS + 1))
    for linear in linears:
        weight = linear.weight.detach()
        linear._knnssd_run = tuple(runner(method, weight, packs.get(id(linear.weight))) for method in methods)
        linear.forward = types.MethodType(_fast_forward, linear)
    return KernelPlan(enabled=True, device=device, threads=threads, rows=methods,
                      packed_bytes=sum(p.numel() * p.element_size() for p in packs.values()))


def restore(model: nn.Module) -> None:
    """Every linear layer back to its class's own forward (undoes `accelerate`)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and "forward" in vars(module):
            del module.forward
            del module._knnssd_run


@contextmanager
def transformers_kernels(model: nn.Module) -> Iterator[None]:
    """Within the block, every linear layer runs transformers' own F.linear (for timing transformers' `generate`
    as it is); the chosen methods come back in a ``finally``."""
    saved = {m: (vars(m)["forward"], m._knnssd_run) for m in model.modules()
             if isinstance(m, nn.Linear) and "forward" in vars(m)}
    try:
        restore(model)
        yield
    finally:
        for module, (forward, run) in saved.items():
            module.forward, module._knnssd_run = forward, run
