"""The engine's kernels against an earlier revision's, in one run: the same bits, and how long each takes.

    python benchmarks/kernel_ab.py --base REV [--model smollm2-135m] [--rows 1,2,4,6,8,12,16,24,32]
                                   [--contexts 200,1500] [--rounds 9] [--passes 1,4,16] [--cflags=-mno-avx512f]
                                   [--out FILE.json]

Builds `knnssd/engine/csrc/rows_kernels.cpp` as it is at git revision REV and as it is in this checkout (two
extensions, with the flags `knnssd.engine.kernel_build` builds them with, plus `--cflags`: `--cflags=-mno-avx512f`
builds and checks the AVX2 code path on an AVX-512 CPU), then:

1. **Bits.** For random inputs of many shapes (1-100 rows, odd sizes, masks and causal attention, grouped-query
   heads of 1-7 per key/value head, head dimensions 16-128), every output of `rows_gemm` and `rows_attention` must
   equal REV's bit for bit; the run stops at the first difference. A kernel change that only reorganises the
   work keeps plain decoding's output, so every speedup measured before stays comparable.
2. **Products.** One pass of `--model`'s products as the engine makes them (each layer's q, k and v joined, o,
   gate and up joined, down, and the LM head; random weights of those shapes, every matrix distinct, so nothing
   stays in cache, all in one arena on huge pages where the OS allows, as `knnssd.engine.weights` places a
   model's) at each row count. (Until 2026-12-05 the matrices were separate and on 4 KB pages.)
3. **Attention.** The model's attention shape (heads, key/value heads, head dimension) over each context, each
   layer its own keys and values (on 4 KB pages; the engine's cache buffers of a megabyte or more lie on huge
   pages), at each row count. (Until 2026-12-05 one cache served every layer, so it was read from the CPU's caches
   and the figures were too low for long contexts.)

4. **Passes** (with `--passes WIDTHS`, e.g. `--passes 1,4,16`). `--model` loaded twice, once on each build (every
   product, attention and `LayerStep` of that model calls its build), weights placed as the engine places them:
   whole passes of each width as `benchmarks/step_cost.py` times them (`benchmarks/ab.py`), after their logits
   are checked equal. This is the plain step and the verify passes themselves, Python and all.

Both builds run alternately, round by round, so a change in the machine's load hits both alike; medians of
`--rounds` rounds, with quartiles. Without `--passes` the model is read for its config only: no weights are loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_description, write_result  # noqa: E402
from knnssd.engine.kernel_build import COMPILE_FLAGS  # noqa: E402

SOURCE = "knnssd/engine/csrc/rows_kernels.cpp"


def build(source: str, label: str, cflags: tuple[str, ...] = ()):
    """The extension built from C++ `source` text with extra `cflags`, in a temporary folder keyed by both."""
    from torch.utils.cpp_extension import load

    # Revisions 77d93fa to 0eae217 registered LayerStep with pybind11 globally: a second build in the process failed
    # to import ("type LayerStep is already registered"). Made module-local, as the source is since.
    source = source.replace('class_<LayerStep>(m, "LayerStep")',
                            'class_<LayerStep>(m, "LayerStep", pybind11::module_local())')
    key = hashlib.sha256((source + " ".join(cflags)).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"knnssd-kernel-ab-{key}"
    folder.mkdir(exist_ok=True)
    path = folder / "rows_kernels.cpp"
    path.write_text(source)
    print(f"building {label} ({key}) ...", flush=True)
    return load(name=f"knnssd_ab_{key}", sources=[str(path)],
                extra_cflags=[*COMPILE_FLAGS, *cflags],
                extra_ldflags=["-fopenmp"], build_directory=str(folder))


def check_bits(base, new) -> int:
    """Compare every output on random shapes; returns how many tensors were compared. Raises on a difference."""
    generator = torch.Generator().manual_seed(0)
    compared = 0
    for rows in (1, 2, 3, 5, 6, 7, 12, 16, 31, 32, 100):
        for n, k in ((577, 576), (64, 1536), (33, 20), (7, 100), (1024, 64)):
            x, w = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
            if not torch.equal(base.rows_gemm(x, w), new.rows_gemm(x, w)):
                raise SystemExit(f"rows_gemm differs from the base at {rows} rows, weight ({n}, {k})")
            compared += 1
    for heads, kv_heads, dim in ((9, 3, 64), (14, 2, 64), (8, 8, 64), (32, 8, 128), (4, 2, 24), (12, 4, 16),
                                 (10, 2, 32), (7, 1, 8), (16, 2, 256)):
        for rows in (1, 2, 5, 16, 32):
            keys = 40 + rows
            q = torch.randn(rows, heads, dim, generator=generator)
            k, v = torch.randn(kv_heads, keys, dim, generator=generator), torch.randn(kv_heads, keys, dim,
                                                                                      generator=generator)
            mask = torch.rand(rows, keys, generator=generator) < 0.7
            mask[:, 0] = True
            for m in (mask, None):
                if not torch.equal(base.rows_attention(q, k, v, m, dim ** -0.5), new.rows_attention(q, k, v, m,
                                                                                                      dim ** -0.5)):
                    raise SystemExit(f"rows_attention differs from the base: {heads} heads on {kv_heads}, "
                                     f"dimension {dim}, {rows} rows, {'mask' if m is not None else 'causal'}")
                compared += 1
    return compared


def model_shapes(name: str) -> dict:
    from knnssd.engine.models import check_model

    config = check_model(name)  # the config only, no weights
    hidden, heads = config.hidden_size, config.num_attention_heads
    dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * dim
    layer = [(heads * dim + 2 * kv, hidden), (hidden, heads * dim), (2 * config.intermediate_size, hidden),
             (hidden, config.intermediate_size)]  # q, k, v joined; o; gate, up joined; down
    return {"layers": config.num_hidden_layers, "layer": layer, "head": (config.vocab_size, hidden),
            "heads": heads, "kv_heads": config.num_key_value_heads, "dim": dim}


def placed(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Random float32 matrices of `shapes`, one after another in one arena (`knnssd.engine.weights.arena`)."""
    from knnssd.engine.weights import arena

    memory, advised, reason = arena(sum(n * k for n, k in shapes) * 4)
    print("weights on huge pages" if advised else f"weights on 4 KB pages: {reason}")
    floats, matrices, offset = memory.view(torch.float32), [], 0
    for n, k in shapes:
        matrix = floats[offset:offset + n * k].view(n, k)
        matrix.copy_(torch.randn(n, k))
        matrices.append(matrix)
        offset += n * k
    return matrices


def models_on(builds: dict, name: str) -> dict:
    """{label: `name` loaded with every kernel call going to builds[label]}: `compiled_kernel()` answers with that
    build while the model loads (a benchmark's reach into `kernel_build`'s cache, restored after)."""
    from knnssd.engine import fastlayer, kernel_build
    from knnssd.engine.models import load_model

    saved, models = dict(kernel_build._COMPILED), {}
    try:
        for label, module in builds.items():
            kernel_build._COMPILED.clear()
            kernel_build._COMPILED["module"] = module
            models[label] = model = load_model(name, device="cpu", dtype="float32").model
            steps = [vars(m)[fastlayer.STEP_ATTRIBUTE] for m in model.modules() if fastlayer.STEP_ATTRIBUTE in vars(m)]
            if not steps or any(step.kernel is not module for step in steps):
                raise SystemExit(f"the {label} model's layers did not take the {label} build's kernels")
    finally:
        kernel_build._COMPILED.clear()
        kernel_build._COMPILED.update(saved)
    return models


def quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 4], ordered[len(ordered) // 2], ordered[(3 * len(ordered)) // 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision whose kernel source is the baseline")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,2,4,6,8,12,16,24,32")
    parser.add_argument("--contexts", default="200,1500")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--passes", default="", help="widths of whole passes to time on the model, e.g. 1,4,16")
    parser.add_argument("--cflags", default="", help="extra compiler flags for both builds, e.g. -mno-avx512f")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cflags = tuple(args.cflags.split())
    base_source = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT, capture_output=True,
                                 text=True)
    if base_source.returncode != 0:
        raise SystemExit(f"cannot read {SOURCE} at {args.base!r}: {base_source.stderr.strip()}")
    builds = {"base": build(base_source.stdout, f"{args.base}'s kernel", cflags),
              "this": build((ROOT / SOURCE).read_text(), "this checkout's kernel", cflags)}
    print(machine_description() + (f"; both kernels built with {' '.join(cflags)} ({builds['this'].lanes} lanes)"
                                   if cflags else ""))
    print(f"bits: {check_bits(builds['base'], builds['this'])} outputs compared, all equal to {args.base}'s")
    shapes = model_shapes(args.model)
    weights = placed([shape for _ in range(shapes["layers"]) for shape in shapes["layer"]] + [shapes["head"]])
    rows_list = [int(r) for r in args.rows.split(",")]
    results: dict = {"base": args.base, "model": args.model, "machine": machine_description(), "cflags": cflags,
                     "products": {},
                     "attention": {}}

    def alternated(measure) -> dict[str, dict[str, float]]:
        """{"base"/"this": {"q1", "median", "q3"}} of `measure(build)` ms, the builds alternated round by round
        (the order flipped each round), round 0 a dropped warm-up."""
        samples: dict[str, list[float]] = {"base": [], "this": []}
        for round_ in range(args.rounds + 1):
            for label in ("base", "this") if round_ % 2 else ("this", "base"):
                start = time.perf_counter()
                measure(builds[label])
                if round_:
                    samples[label].append((time.perf_counter() - start) * 1e3)
        return {label: dict(zip(("q1", "median", "q3"), quartiles(v))) for label, v in samples.items()}

    def line(rows: int, q: dict[str, dict[str, float]], digits: int) -> str:
        cells = [f"{q[b]['median']:6.{digits}f} [{q[b]['q1']:5.{digits}f}, {q[b]['q3']:5.{digits}f}]"
                 for b in ("base", "this")]
        return f"{rows:5d}   {cells[0]}   {cells[1]}   {q['this']['median'] / q['base']['median']:8.2f}"

    print(f"\nproducts of one {args.model} pass (ms, median [q1, q3] of {args.rounds} rounds, alternating builds)")
    print(" rows            base                 this      this/base")
    for rows in rows_list:
        x_by_k = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
        results["products"][rows] = q = alternated(
            lambda module: [module.rows_gemm(x_by_k[w.shape[1]], w) for w in weights])
        print(line(rows, q, 1))
    for context in (int(c) for c in args.contexts.split(",")):
        print(f"\nattention over {context} keys, x {shapes['layers']} layers (ms)")
        print(" rows            base                 this      this/base")
        for rows in rows_list:
            keys = context + rows
            query = torch.randn(rows, shapes["heads"], shapes["dim"])
            caches = [[torch.randn(shapes["kv_heads"], keys, shapes["dim"]) for _ in range(2)]
                      for _ in range(shapes["layers"])]  # every layer its own keys and values, as in a step
            mask = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
            results["attention"].setdefault(context, {})[rows] = q = alternated(
                lambda module: [module.rows_attention(query, k, v, mask, shapes["dim"] ** -0.5)
                                for k, v in caches])
            print(line(rows, q, 2))
    if args.passes:
        passes(builds, args, results)
    write_result(args.out, results)


def passes(builds: dict, args: argparse.Namespace, results: dict) -> None:
    """Whole passes of the model on each build: logits equal, then alternating timings per context."""
    from contextlib import nullcontext

    from benchmarks.ab import alternate, first_difference, print_table

    widths = [int(w) for w in args.passes.split(",")]
    models = models_on(builds, args.model)
    ways = {label: (model, nullcontext) for label, model in models.items()}
    differs = first_difference(ways, widths)
    if differs is not None:
        raise SystemExit(f"passes of width {differs} differ between the builds")
    print(f"\npasses of {args.model}: logits of widths {widths} equal on both builds")
    results["passes"] = {}
    for context in (int(c) for c in args.contexts.split(",")):
        results["passes"][context] = table = alternate(ways, context, widths, args.rounds)
        print_table(table, "base", "this", context, args.rounds)


if __name__ == "__main__":
    main()
