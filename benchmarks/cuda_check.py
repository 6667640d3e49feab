"""The CUDA path, checked and timed where a GPU is lent (it runs on CPU too, for comparison).

1. Losslessness on the device: every drafter of the shared losslessness test (layer skip, prompt lookup, hybrid,
   adaptive...) on tiny random Llama / Qwen2 / Mistral models, greedy, token-identical to transformers'
   `model.generate(do_sample=False)` on the same device in fp32.
2. Step costs of a model shaped exactly like SmolLM2-135M (30 layers, hidden 576, vocab 49,152; random weights,
   as the real checkpoint is not on the GPU machine): a plain step, verify steps of k + 1 tokens, layer-skip draft
   steps, each as the loop runs them, in fp32 and bf16. Random weights change acceptance, not cost.

    python benchmarks/cuda_check.py [--device cuda] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knnssd.engine.decoding import GenerationConfig, verify, device_clock, generate  # noqa: E402
from knnssd.engine.drafters import Draft, LayerSkipConfig, DraftRequest, LayerSkipDrafter  # noqa: E402
from knnssd.engine.kvcache import new_cache, rollback  # noqa: E402
from knnssd.engine.sampling import SamplingConfig  # noqa: E402
from knnssd.engine.skipset import SkipSet  # noqa: E402
from tests.conftest import FAMILIES, tiny_model  # noqa: E402
from tests.test_lossless import drafters_under_test, reference  # noqa: E402


def lossless(device: str) -> dict[str, int]:
    runs = mismatches = 0
    for family in FAMILIES:
        for seed in (0, 1, 2):
            model = tiny_model(family, seed=seed).to(device)
            generator = torch.Generator().manual_seed(100 + seed)
            for length in (1, 9, 23):
                prompt = torch.randint(3, 128, (1, length), generator=generator).to(device)
                expected = reference(model, prompt, 40)
                for name, drafter in drafters_under_test():
                    got = generate(model, prompt, GenerationConfig(max_new_tokens=40), drafter)
                    runs += 1
                    if got.token_ids != expected:
                        mismatches += 1
                        print(f"MISMATCH {family} seed {seed} len {length} {name}")
    return {"runs": runs, "mismatches": mismatches}


def smollm2_shaped(device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def step_costs(device: str, dtype: torch.dtype, steps: int, context: int = 200) -> dict[str, float]:
    model = smollm2_shaped(device, dtype)
    clock = device_clock(torch.device(device))
    prompt = torch.randint(100, 1000, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    cache = new_cache(model)
    model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)

    def median_ms(run) -> float:
        for _ in range(3):
            run()
            rollback(cache, context)
        times = []
        for _ in range(steps):
            start = clock()
            run()
            times.append(clock() - start)
            rollback(cache, context)
        return sorted(times)[len(times) // 2] * 1000

    results = {}
    for k in (0, 1, 3, 7):
        draft = Draft(tokens=torch.randint(100, 1000, (k,), device=device), probs=None)
        results[f"verify k={k}" if k else "plain step"] = median_ms(
            lambda: verify(model, cache, 123, draft, context, SamplingConfig(), None))
    history = prompt[0].tolist()
    for name, skip in (("draft step, attn 25 skipped", SkipSet.of(attn=[25])),
                       ("draft step, 15 attn skipped", SkipSet.of(attn=range(15, 30))),
                       ("draft step, half of all skipped", SkipSet.of(attn=range(0, 30, 2), mlp=range(1, 30, 2)))):
        session = LayerSkipDrafter(skip, LayerSkipConfig(threshold=0.0, max_draft_tokens=1)).start()
        request = DraftRequest(model=model, cache=cache, last_token=prompt[:, -1:], position=context, max_tokens=1,
                               sampling=SamplingConfig(), generator=None, history=history)
        results[name] = median_ms(lambda: session.propose(request))
    plain = results["plain step"]
    return {name: round(value, 3) for name, value in results.items()} | {
        "c (half skipped)": round(results["draft step, half of all skipped"] / plain, 3),
        "v (k=3)": round(results["verify k=3"] / plain, 3)}


def loop_vs_transformers(device: str, dtype: torch.dtype, tokens: int = 64) -> dict[str, float]:
    """Per-token time of plain decoding: our loop vs transformers' generate (the loop's own overhead)."""
    model = smollm2_shaped(device, dtype)
    prompt = torch.randint(100, 1000, (1, 100), generator=torch.Generator().manual_seed(0)).to(device)
    clock = device_clock(torch.device(device))
    config = GenerationConfig(max_new_tokens=tokens, eos_token_ids=())
    for _ in range(2):
        generate(model, prompt, config)
        model.generate(prompt, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    ours, theirs = [], []
    for _ in range(5):
        start = clock()
        generate(model, prompt, config)
        ours.append(clock() - start)
        start = clock()
        model.generate(prompt, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        theirs.append(clock() - start)
    return {"knnssd ms/token": round(sorted(ours)[2] / tokens * 1000, 3),
            "transformers ms/token": round(sorted(theirs)[2] / tokens * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"# device {args.device} ({name}), torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    report = {"device": name, "torch": torch.__version__, "lossless_fp32": lossless(args.device)}
    print("lossless:", report["lossless_fp32"], flush=True)
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        report[f"costs_{label}"] = step_costs(args.device, dtype, args.steps)
        print(f"step costs {label} (ms):", json.dumps(report[f"costs_{label}"]), flush=True)
        report[f"loop_{label}"] = loop_vs_transformers(args.device, dtype)
        print(f"plain decoding {label}:", json.dumps(report[f"loop_{label}"]), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
