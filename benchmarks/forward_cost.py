"""Where a decoding step's time goes: one 1-token forward of SmolLM2 at a 200-token context with whole groups
of sub-layers skipped, and the LM head alone (median of 20 steps each).

    python benchmarks/forward_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knnssd.engine.kvcache import new_cache  # noqa: E402
from knnssd.engine.sublayers import skip_sublayers  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.skipset import SkipSet  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1000


@torch.inference_mode()
def step_ms(model, prompt: torch.Tensor, skip: SkipSet, steps: int = 20) -> float:
    cache = new_cache(model)
    model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    token, times = prompt[:, -1:], []
    with skip_sublayers(model, skip):
        for i in range(steps):
            start = time.perf_counter()
            model(input_ids=token, position_ids=torch.tensor([[prompt.shape[1] + i]]), cache=cache, use_cache=True,
                  logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return median_ms(times)


def main() -> None:
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    model, layers = loaded.model, loaded.num_layers
    prompt = torch.randint(100, 1000, (1, 200), generator=torch.Generator().manual_seed(0))
    rows = {"full model": SkipSet(), "every attention skipped": SkipSet.of(attn=range(layers)),
            "every MLP skipped": SkipSet.of(mlp=range(layers)),
            "all but one sub-layer skipped": SkipSet.of(attn=range(layers), mlp=range(1, layers))}
    for name, skip in rows.items():
        print(f"{name:<32}{step_ms(model, prompt, skip):7.1f} ms")
    hidden = torch.randn(1, 1, model.config.hidden_size)
    with torch.inference_mode():
        times = []
        for _ in range(20):
            start = time.perf_counter()
            model.lm_head(hidden)
            times.append(time.perf_counter() - start)
    print(f"{'LM head alone':<32}{median_ms(times):7.1f} ms")


if __name__ == "__main__":
    main()
