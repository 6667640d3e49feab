"""The decoding loop's own cost: what a step costs in the loop against the model's bare forward pass.

For SmolLM2 on this machine, at a context of `--context` tokens (median of `--steps` repeats each):
  - bare (k + 1)-token forward vs one verification step of the loop (forward, acceptance, rollback), k = 1, 3, 7;
    the bare forward is also split into its base model and LM head;
  - the top entries of cProfile over a whole drafted generation, outside torch's own modules.

    python benchmarks/loop_profile.py [--context 200] [--steps 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, verify, generate  # noqa: E402
from knnssd.engine.drafters import Draft, LayerSkipConfig, LayerSkipDrafter  # noqa: E402
from knnssd.engine.kvcache import new_cache, rollback  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.sampling import SamplingConfig  # noqa: E402
from knnssd.engine.skipset import SkipSet  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1000


@torch.inference_mode()
def verify_costs_ms(model, cache, context: int, width: int, steps: int) -> tuple[float, float, float]:
    """Medians of (bare forward with logits for all `width` positions, its base model alone, the loop's
    verification step) at positions [context, context + width), interleaved so that drift hits all three.
    The cache is cropped back to `context` after each."""
    ids = torch.randint(100, 1000, (1, width), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(context, context + width).unsqueeze(0)
    draft = Draft(tokens=ids[0, 1:], probs=None)
    runs = {
        "bare": lambda: model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                              logits_to_keep=width),
        "base": lambda: model.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True),
        "loop": lambda: verify(model, cache, int(ids[0, 0]), draft, context, SamplingConfig(), None),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            rollback(cache, context)
    return median_ms(times["bare"]), median_ms(times["base"]), median_ms(times["loop"])


def profile_generation(model, prompt: torch.Tensor, top: int = 25) -> str:
    drafter = LayerSkipDrafter(SkipSet.of(attn=[25]), LayerSkipConfig())
    config = GenerationConfig(max_new_tokens=64, eos_token_ids=())
    generate(model, prompt, GenerationConfig(max_new_tokens=4), drafter)
    profiler = cProfile.Profile()
    profiler.enable()
    generate(model, prompt, config, drafter)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    model = load_model("smollm2-135m", device="cpu", dtype="float32").model
    print(f"# {machine_description()}; context {args.context}, median of {args.steps}")
    prompt = torch.randint(100, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    cache = new_cache(model)
    with torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    for k in (0, 1, 3, 7):
        full, base, ours = verify_costs_ms(model, cache, args.context, k + 1, args.steps)
        label = "plain step (k = 0)" if k == 0 else f"verify step, k = {k}"
        print(f"{label:<28} bare forward {full:6.1f} ms (base model {base:5.1f}, LM head "
              f"{full - base:5.1f})   loop {ours:6.1f} ms   overhead {ours - full:+5.1f} ms")
    if not args.no_profile:
        print("\n# cProfile of a 64-token layer-skip generation (attention 25 skipped), by own time")
        print(profile_generation(model, prompt[:, :60]))


if __name__ == "__main__":
    main()
