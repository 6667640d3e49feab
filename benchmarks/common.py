"""Helpers shared by the benchmarks: Spec-Bench prompts and timing."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def spec_bench_file(path: str | None) -> Path:
    """`path`, else $KNNSSD_SPEC_BENCH, else ../shared/data/spec_bench/question.jsonl beside the repo."""
    chosen = path or os.environ.get("KNNSSD_SPEC_BENCH") or REPO_ROOT.parent / "shared/data/spec_bench/question.jsonl"
    chosen = Path(chosen)
    if not chosen.is_file():
        raise SystemExit(f"error: Spec-Bench file {chosen} not found (fix: pass --data PATH or set KNNSSD_SPEC_BENCH)")
    return chosen


def load_spec_bench(path: str | None) -> list[dict]:
    return [json.loads(line) for line in spec_bench_file(path).read_text().splitlines() if line.strip()]


def pick_prompts(rows: list[dict], categories: list[str], per_category: int) -> list[tuple[str, str]]:
    """The first `per_category` prompts (first turn) of each category, as (category, text)."""
    picked = []
    for category in categories:
        texts = [row["turns"][0] for row in rows if row["category"] == category][:per_category]
        if not texts:
            known = sorted({row["category"] for row in rows})
            raise SystemExit(f"error: no Spec-Bench prompts in category {category!r} (known: {', '.join(known)})")
        picked.extend((category, text) for text in texts)
    return picked


def cpu_name_and_flags() -> tuple[str, str]:
    """The CPU's model name and the vector flags every speed figure depends on: AVX-512 (which subsets), AMX,
    AVX2 and FMA, each said yes or no."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    amx = sorted(f for f in flags if f.startswith("amx"))
    said = [f"AVX-512 {'yes (' + ' '.join(avx512) + ')' if avx512 else 'no'}", f"AMX {'yes' if amx else 'no'}",
            f"AVX2 {'yes' if 'avx2' in flags else 'no'}", f"FMA {'yes' if 'fma' in flags else 'no'}"]
    return name, ", ".join(said)


def kernel_status() -> str:
    """Whether the engine's kernels run here ("kernels: avx2, batch-invariant") or the library fallback does, and
    why: every figure changes with it."""
    from knnssd.engine.kernel_build import compile_error, compiled_kernel, vector_isa

    if compiled_kernel() is not None:
        return f"kernels: {vector_isa()}, batch-invariant"
    return f"kernels: FALLBACK to library products ({compile_error()})"


def machine_description() -> str:
    """One line for every benchmark's header: cores, CPU and its vector flags, GPU, torch, threads, kernels."""
    name, flags = cpu_name_and_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({name}; {flags}), {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {kernel_status()}")


def chosen_names(flag: str, text: str | None, available: list[str]) -> list[str]:
    """The names a comma-separated flag value picks out of `available`, in `available`'s order (all of them when
    the flag is empty); an unknown name is a clear error naming the choices."""
    if not text:
        return list(available)
    from knnssd.errors import KnnSsdError

    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise KnnSsdError(f"{flag}: unknown {unknown}", fix=f"choose from: {', '.join(available)}")
    return [name for name in available if name in chosen]


def write_result(path: str | None, result: dict) -> None:
    """Write a benchmark's `result` as indented JSON to `path` (its folder made), and say where; nothing if None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"\n-> {path}")
