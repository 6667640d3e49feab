"""What a whole forward's matrix products cost by row count: the C++ kernel against MKL's F.linear, cache-cold.

    python benchmarks/products_cost.py [--rows 1,2,3,4,8,13,16] [--repeats 7]

A verify pass of w tokens multiplies every weight by w rows. This times exactly those products for a model of
SmolLM2-135M's shapes (random weights; 30 layers of q 576x576, k and v 192x576, o 576x576, gate and up
1536x576, down 576x1536, then the 49152x576 LM head: 540 MB, far beyond the caches, so every weight comes from
memory as in decoding), one forward's worth per sample, the two methods in a shuffled order each round; median
of `--repeats` rounds. Isolates the products from the rest of a step (`benchmarks/step_cost.py` times whole
passes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description  # noqa: E402
from knnssd.engine.kernels import compiled_kernel, compile_error  # noqa: E402

LAYER_SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
LAYERS, LM_HEAD = 30, (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,8,13,16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    kernel = compiled_kernel()
    if kernel is None:
        sys.exit(f"error: {compile_error()} (fix: run on an AVX-512 CPU with a C++ compiler and ninja)")
    torch.manual_seed(0)
    weights = [torch.randn(*shape) for _ in range(LAYERS) for shape in LAYER_SHAPES] + [torch.randn(*LM_HEAD)]
    print(f"{machine_description()}; "
          f"{sum(w.numel() for w in weights) * 4 / 1e6:.0f} MB of weights")
    methods = {"F.linear": F.linear, "kernel": kernel.rows_gemm}
    rows = [int(r) for r in args.rows.split(",")]
    samples: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for count in rows:
            inputs = {k: torch.randn(count, k) for k in (576, 1536)}
            for name in random.sample(list(methods), len(methods)):
                start = time.perf_counter()
                for weight in weights:
                    methods[name](inputs[weight.shape[1]], weight)
                samples.setdefault((count, name), []).append((time.perf_counter() - start) * 1e3)
    print(f"{'rows':>5}" + "".join(f"{name + ' ms':>14}" for name in methods))
    for count in rows:
        print(f"{count:>5}" + "".join(f"{statistics.median(samples[(count, name)][1:]):>14.1f}" for name in methods))


if __name__ == "__main__":
    main()
