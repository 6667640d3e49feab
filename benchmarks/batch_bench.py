"""Batched decoding in the engine, without HTTP: throughput of B requests stepped together against the same
requests one at a time, on one machine in one run, with every greedy answer checked against plain decoding alone.

Systems, on the same requests (each at most --max-tokens new tokens, greedy):
  alone-plain   plain decoding, one request at a time (the reference answers; the speedup's denominator)
  alone-spec    the drafter, one request at a time (its own draft length)
  batch-plain   plain decoding, B requests stepped together (`knnssd.engine.decoding.step`), refilled as they end
  batch-spec    the drafter, B together, draft lengths from the token budget (`knnssd.engine.budget`, pass costs
                timed first on this machine)
Per system and B: tokens/s (all new tokens over the wall time), tokens per verify step per request (accepted + 1),
the mean batch size, and how many answers differ from alone-plain's (the goal is 0; on a GPU or without the
engine's kernels, library products make near-ties possible).

Model: the built-in SmolLM2-135M on Spec-Bench prompts, or `--shape smollm2` (random weights of SmolLM2's shape,
for a GPU machine that does not hold the checkpoint) on random prompts with repeated spans (so lookups find
text; acceptance on random weights says nothing about real text, costs and identity do).

    python benchmarks/batch_bench.py --requests 16 --max-tokens 64 --batch 1,4,8,16
    python benchmarks/batch_bench.py --shape smollm2 --device cuda --requests 32 --batch 1,8,32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_spec_bench, machine_description  # noqa: E402
from knnssd.engine.budget import batch_caps, time_pass_costs  # noqa: E402
from knnssd.engine.decoding import Generation, GenerationConfig, begin, device_clock, generate, step  # noqa: E402
from knnssd.engine.drafters import (PromptLookupConfig, PromptLookupDrafter, SuffixTreeConfig,  # noqa: E402
                                    SuffixTreeDrafter)

DRAFTERS = {"lookup": ("prompt lookup (n-grams 1-3, <= 8 tokens)",
                       lambda: PromptLookupDrafter(PromptLookupConfig(max_ngram=3, max_draft_tokens=8))),
            "tree": ("suffix tree of the request's text (<= 15 nodes)",
                     lambda: SuffixTreeDrafter(SuffixTreeConfig()))}

SYSTEMS = ("alone-plain", "alone-spec", "batch-plain", "batch-spec")


def requests_of(args, tokenizer, vocab: int, device: torch.device) -> list[torch.Tensor]:
    if tokenizer is not None:
        from knnssd.engine.prompts import encode_prompt

        rows = load_spec_bench(args.data)
        categories = sorted({row["category"] for row in rows})
        texts = [[r for r in rows if r["category"] == c][i // len(categories)]["turns"][0]
                 for i in range(args.requests) for c in [categories[i % len(categories)]]]
        return [encode_prompt(tokenizer, text, chat=True).to(device) for text in texts]
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(args.requests):
        span = torch.randint(100, min(vocab, 5000), (24,), generator=generator)
        prompts.append(torch.cat([span, torch.randint(100, 5000, (40,), generator=generator), span])[None]
                       .to(device))
    return prompts


def run(model, prompts, config, drafter, batch: int | None, costs) -> tuple[list[tuple[int, ...]], float, dict]:
    """Answers, wall seconds and counts of one system: `batch` None runs one request at a time."""
    clock = device_clock(next(model.parameters()).device)
    start = clock()
    answers: dict[int, tuple[int, ...]] = {}
    steps = accepted = 0
    sizes: list[int] = []
    if batch is None:
        for i, prompt in enumerate(prompts):
            result = generate(model, prompt, config, drafter)
            answers[i] = result.token_ids
            steps += result.stats.verify_steps
            accepted += result.stats.accepted_tokens
            sizes.append(1)
    else:
        waiting, running = list(enumerate(prompts)), []
        while waiting or running:
            while waiting and len(running) < batch:
                i, prompt = waiting.pop(0)
                started = begin(model, prompt, config)
                running.append((i, Generation(model, started.state, config, drafter, started.generator,
                                              started.clock)))
            generations = [g for _, g in running]
            step(model, generations, batch_caps(generations, costs) if drafter is not None else None)
            sizes.append(len(running))
            for i, g in [(i, g) for i, g in running if g.done]:
                result = g.result()
                answers[i] = result.token_ids
                steps += result.stats.verify_steps
                accepted += result.stats.accepted_tokens
            running = [(i, g) for i, g in running if not g.done]
    seconds = clock() - start
    return [answers[i] for i in range(len(prompts))], seconds, {
        "tokens_per_step": (accepted + steps) / max(1, steps), "mean_batch": sum(sizes) / len(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", choices=["smollm2"], default=None, help="random weights of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", default="1,4,8,16")
    parser.add_argument("--drafter", choices=sorted(DRAFTERS), default="lookup")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    device = torch.device(args.device)
    if args.shape:
        from benchmarks.cuda_check import smollm2_shaped

        model, tokenizer = smollm2_shaped(args.device, getattr(torch, args.dtype)), None
        described = f"random weights of SmolLM2's shape, {args.dtype}"
    else:
        from knnssd.engine.models import load_model

        loaded = load_model(args.model, device=args.device)
        model, tokenizer, described = loaded.model, loaded.tokenizer, f"{loaded.name} ({loaded.kernels.describe()})"
    print(machine_description(), "|", described, flush=True)
    prompts = requests_of(args, tokenizer, int(model.config.vocab_size), device)
    config = GenerationConfig(max_new_tokens=args.max_tokens, eos_token_ids=())
    drafter_name, make_drafter = DRAFTERS[args.drafter]
    drafter = make_drafter()
    generate(model, prompts[0][:, :8], GenerationConfig(max_new_tokens=4, eos_token_ids=()), drafter)  # warm-up
    t0 = time.perf_counter()
    costs = time_pass_costs(model)
    print(f"pass costs timed in {time.perf_counter() - t0:.0f} s (in 1-row passes): " +
          ", ".join(f"{w}: {c:.2f}" for w, c in costs.relative().items()), flush=True)
    reference, seconds, counts = run(model, prompts, config, None, None, costs)
    tokens = sum(len(a) for a in reference)
    rows = [{"system": "alone-plain", "batch": 1, "tok_s": tokens / seconds, **counts, "mismatches": 0}]
    plan = [("alone-spec", drafter, None)] + [(name, d, b) for b in batches if b > 1
                                              for name, d in (("batch-plain", None), ("batch-spec", drafter))]
    for name, d, b in plan:
        answers, seconds, counts = run(model, prompts, config, d, b, costs)
        rows.append({"system": name, "batch": b or 1, "tok_s": sum(len(a) for a in answers) / seconds, **counts,
                     "mismatches": sum(a != r for a, r in zip(answers, reference))})
        print(f"{name} B={b or 1}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    base = rows[0]["tok_s"]
    print(f"\n{len(prompts)} requests x {args.max_tokens} new tokens, greedy, {drafter_name}")
    print("| system | B | tok/s | vs alone-plain | tokens/step | mean batch | answers != alone-plain |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['system']} | {row['batch']} | {row['tok_s']:.1f} | {row['tok_s'] / base:.2f}x | "
              f"{row['tokens_per_step']:.2f} | {row['mean_batch']:.1f} | {row['mismatches']}/{len(prompts)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_description(), "model": described,
                                              "drafter": drafter_name,
                                              "costs": costs.relative(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
