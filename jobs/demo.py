"""Generation demo: plain vs self-speculative decoding on the built-in prompts.

    python jobs/demo.py [--model smollm2-135m] [--per-domain 2] [--max-new-tokens 64] [--skip-set JSON]

For each prompt: plain decoding, then layer-skip self-speculative decoding with
the same model, checked token-identical; then a per-domain summary table.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from knnssd.engine.decoding import GenerationConfig, generate, warm_up  # noqa: E402
from knnssd.demo_prompts import DEMO_PROMPTS, demo_domains  # noqa: E402
from knnssd.engine.drafters import LayerSkipConfig, LayerSkipDrafter  # noqa: E402
from knnssd.cli.entry import ArgumentParser, run_main  # noqa: E402
from knnssd.errors import KnnSsdError  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.prompts import encode_prompt  # noqa: E402
from knnssd.engine.skipset import SkipSet  # noqa: E402

# Found by benchmarks/proxy_skip_search.py on Spec-Bench for SmolLM2-135M (see BENCHMARKS.md).
SMOLLM2_SKIP_SET = '{"attn": [4, 6, 25], "mlp": []}'


def run(args: argparse.Namespace) -> None:
    if args.per_domain < 1:
        raise KnnSsdError(f"--per-domain must be >= 1, got {args.per_domain}", fix="e.g. --per-domain 2")
    loaded = load_model(args.model, device=args.device)
    skip_set = SkipSet.parse(args.skip_set).validate(loaded.num_layers)
    drafter = LayerSkipDrafter(skip_set, LayerSkipConfig())
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(f"model {loaded.name} ({loaded.num_layers} layers, hash {loaded.model_hash[:12]}) on {loaded.device}")
    print(f"skip set {skip_set.to_json()} ({skip_set.skip_ratio(loaded.num_layers):.0%} of sub-layers)\n")
    warm_up(loaded.model, encode_prompt(loaded.tokenizer, "warm up", chat=True))
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for domain in demo_domains():
        texts = [text for d, text in DEMO_PROMPTS if d == domain][: args.per_domain]
        for text in texts:
            ids = encode_prompt(loaded.tokenizer, text, chat=True)
            plain = generate(loaded.model, ids, config)
            ssd = generate(loaded.model, ids, config, drafter)
            same = "identical" if ssd.token_ids == plain.token_ids else "MISMATCH"
            answer = loaded.tokenizer.decode(list(ssd.token_ids), skip_special_tokens=True).strip().replace("\n", " ")
            print(f"[{domain}] {text[:60]}")
            print(f"   -> {answer[:90]}")
            print(f"   plain {plain.stats.tokens_per_second:5.1f} tok/s | self-speculative "
                  f"{ssd.stats.tokens_per_second:5.1f} tok/s, mean accepted {ssd.stats.mean_accepted_tokens:.2f} "
                  f"| tokens {same}")
            t = totals[domain]
            t[0] += plain.stats.total_seconds
            t[1] += ssd.stats.total_seconds
            t[2] += ssd.stats.accepted_tokens + ssd.stats.verify_steps
            t[3] += ssd.stats.verify_steps
            if same != "identical":
                raise RuntimeError("self-speculative output differed from plain decoding: this is a bug")
    print(f"\n{'domain':<14}{'speedup':>9}{'mean accepted':>15}")
    for domain, (plain_s, ssd_s, committed, steps) in totals.items():
        print(f"{domain:<14}{plain_s / ssd_s:>8.2f}x{committed / steps:>15.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    parser.add_argument("--model", default="smollm2-135m", help="Hugging Face id, local folder, or built-in name.")
    parser.add_argument("--skip-set", default=SMOLLM2_SKIP_SET, help="the layer-skip drafter's skip set (JSON).")
    parser.add_argument("--per-domain", type=int, default=2, help="built-in prompts per domain.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
    args = parser.parse_args(argv)
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
