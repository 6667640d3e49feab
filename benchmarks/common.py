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


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
