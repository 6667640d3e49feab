"""The CPU's fp32 peak, measured: the least time a wide verify pass's products could take on this CPU.

    python benchmarks/fma_peak.py [--threads N] [--model smollm2-135m] [--widths 1,4,8,16,24,32]

A memory-bound step costs one read of the weights (`benchmarks/step_cost.py`'s floor). A wide pass also has to
multiply: w rows x P weights x 2 flops. This script times independent fused multiply-add chains (12 per thread,
enough to hide the FMA latency) in the widest vectors the kernels use (AVX-512 or AVX2), on 1 thread and on N
threads at once, and prints, for each width, the products' least time at that peak (compare it with
`benchmarks/step_cost.py`'s memory floor): the bound no kernel of this precision beats on this CPU. Nothing here
is a speed of the engine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>
#include <omp.h>

// seconds for `iterations` rounds of 12 independent vector FMA chains on each of `threads` threads
double fma_seconds(int64_t iterations, int64_t threads) {
  double seconds = 0.0;
  float sink = 0.0f;
  auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
#if defined(__AVX512F__)
    __m512 a[12], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
    for (int64_t n = 0; n < iterations; ++n)
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
    for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(a[i]);
#else
    __m256 a[12], b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
    for (int64_t n = 0; n < iterations; ++n)
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
    float out[8];
    for (int i = 0; i < 12; ++i) { _mm256_storeu_ps(out, a[i]); for (float x : out) sink += x; }
#endif
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return sink == 12345.0f ? -seconds : seconds;  // keeps the chains alive
}

int64_t lanes() {
#if defined(__AVX512F__)
  return 16;
#else
  return 8;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fma_seconds", &fma_seconds);
  m.def("lanes", &lanes);
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    folder = Path(tempfile.gettempdir()) / "knnssd-fma-peak"
    folder.mkdir(exist_ok=True)
    return load_inline("knnssd_fma_peak", cpp_sources=SOURCE, extra_cflags=["-O2", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], build_directory=str(folder))


def gflops(module, threads: int, iterations: int = 100_000_000, repeats: int = 5) -> float:
    """Best of `repeats`: fp32 GFLOP/s of all `threads` threads together."""
    best = min(abs(module.fma_seconds(iterations, threads)) for _ in range(repeats))
    return threads * iterations * 12 * module.lanes() * 2 / best / 1e9


def weights_of(model_name: str) -> int:
    """Multiply-adds of one row through the model: every product's weights (embedding lookup excluded)."""
    from knnssd.engine.models import load_model

    model = load_model(model_name).model
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--widths", default="1,4,8,16,24,32")
    args = parser.parse_args()
    module = build()
    one, all_ = gflops(module, 1), gflops(module, args.threads)
    print(machine_description())
    print(f"fp32 FMA peak ({module.lanes()} lanes): 1 thread {one:.1f} GFLOP/s, {args.threads} threads {all_:.1f}")
    weights = weights_of(args.model)
    print(f"{args.model}: {weights / 1e6:.1f}M weights in its products")
    print(" width   GFLOP a pass   least ms at peak")
    for width in (int(w) for w in args.widths.split(",")):
        flop = 2 * weights * width
        print(f"{width:6d}   {flop / 1e9:12.2f}   {flop / (all_ * 1e9) * 1e3:16.1f}")


if __name__ == "__main__":
    main()
