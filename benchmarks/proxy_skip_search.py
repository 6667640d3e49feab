"""Greedy proxy search for layer-skip sets: a quick way to find candidate skip sets.

For each Spec-Bench category sampled, the full model's greedy continuation is
computed once; a candidate skip set is scored by teacher-forced agreement: the
fraction of continuation positions where the skipping model's argmax (one
forward over prompt + continuation) equals the full model's. Starting from the
empty set, the sub-layer whose removal keeps agreement highest is added, step
by step. This proxy ignores timing; `bench_engine.py` measures real speedups.

    python benchmarks/proxy_skip_search.py --steps 12 --per-category 1 --out benchmarks/results/proxy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import load_spec_bench, pick_prompts  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, generate  # noqa: E402
from knnssd.engine.sublayers import skip_sublayers  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.prompts import encode_prompt  # noqa: E402
from knnssd.engine.skipset import SkipSet  # noqa: E402


@torch.inference_mode()
def agreement(model, sequences, skip_set: SkipSet) -> float:
    """Mean over sequences of P(argmax with skipping == full model's next token) on the continuation."""
    scores = []
    with skip_sublayers(model, skip_set):
        for full_ids, prompt_length in sequences:
            logits = model(input_ids=full_ids).logits[0, prompt_length - 1:-1]
            target = full_ids[0, prompt_length:]
            scores.append((logits.argmax(-1) == target).float().mean().item())
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="Spec-Bench question.jsonl")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--categories", default="translation,qa,math_reasoning,coding")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-prompt-tokens", type=int, default=192, help="keep the prompt's last N tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    model, layers = loaded.model, loaded.num_layers
    prompts = pick_prompts(load_spec_bench(args.data), args.categories.split(","), args.per_category)
    sequences = []
    for _, text in prompts:
        ids = encode_prompt(loaded.tokenizer, text, chat=True)[:, -args.max_prompt_tokens:]
        out = generate(model, ids, GenerationConfig(max_new_tokens=args.max_new_tokens))
        sequences.append((torch.cat([ids, torch.tensor([out.token_ids])], dim=1), ids.shape[1]))
    chosen = SkipSet()
    history = []
    for step in range(args.steps):
        start = time.perf_counter()
        best = None
        for kind in ("attn", "mlp"):
            for index in range(layers):
                if index in getattr(chosen, kind):
                    continue
                candidate = SkipSet.of(attn=chosen.attn + ((index,) if kind == "attn" else ()),
                                       mlp=chosen.mlp + ((index,) if kind == "mlp" else ()))
                score = agreement(model, sequences, candidate)
                if best is None or score > best[0]:
                    best = (score, candidate)
        chosen = best[1]
        history.append({"size": chosen.num_skipped, "agreement": best[0], "skip_set": chosen.to_dict()})
        print(f"step {step + 1}: agreement {best[0]:.3f} skip {chosen.to_json()} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(history, indent=2))


if __name__ == "__main__":
    main()
