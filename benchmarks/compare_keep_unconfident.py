"""Drop or keep the draft token whose confidence stopped drafting (and two thresholds), back to back on the
first Spec-Bench prompt of four categories, skip set {"attn": [4, 6, 25]}, 64 new tokens, greedy.

    python benchmarks/compare_keep_unconfident.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import load_spec_bench, pick_prompts  # noqa: E402
from knnssd import LayerSkipConfig, GenerationConfig, LayerSkipDrafter, SkipSet, encode_prompt, generate, load_model  # noqa: E402

VARIANTS = {"drop": LayerSkipConfig(keep_unconfident=False), "keep": LayerSkipConfig(),
            "keep-t0.6": LayerSkipConfig(threshold=0.6), "keep-t0.9": LayerSkipConfig(threshold=0.9)}


def main() -> None:
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    model = loaded.model
    prompts = pick_prompts(load_spec_bench(None), ["translation", "coding", "qa", "math_reasoning"], 1)
    config = GenerationConfig(max_new_tokens=64)
    skip = SkipSet.of(attn=[4, 6, 25])
    generate(model, encode_prompt(loaded.tokenizer, "hi", chat=True), GenerationConfig(max_new_tokens=3))
    totals = {name: [0.0, 0.0] for name in VARIANTS}
    for category, text in prompts:
        ids = encode_prompt(loaded.tokenizer, text, chat=True)
        plain = generate(model, ids, config)
        for name, draft_config in VARIANTS.items():
            result = generate(model, ids, config, LayerSkipDrafter(skip, draft_config))
            assert result.token_ids == plain.token_ids
            totals[name][0] += plain.stats.total_seconds
            totals[name][1] += result.stats.total_seconds
            print(f"{category:<16}{name:<11}speedup {plain.stats.total_seconds / result.stats.total_seconds:.3f}  "
                  f"mean accepted {result.stats.mean_accepted_tokens:.2f}")
    for name, (plain_s, drafted_s) in totals.items():
        print(f"overall {name:<11}{plain_s / drafted_s:.3f}")


if __name__ == "__main__":
    main()
