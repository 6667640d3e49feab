"""The `knnssd` command line.

    knnssd generate --model smollm2-135m --prompt "Hi" --chat --skip-set '{"attn":[24],"mlp":[]}' --compare-ar --json

Bad input prints one line, ``error: <problem> (fix: <what to do>)``, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from knnssd.errors import KnnSsdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnssd", description="KNN-SSD: dynamic self-speculative decoding")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text, plainly or with self-speculative drafting")
    gen.add_argument("--model", required=True, help="Hugging Face id, local folder, or built-in name (smollm2-135m)")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--skip-set", help='JSON {"attn": [...], "mlp": [...]} or a path to a JSON file; '
                                        "without it, plain decoding")
    gen.add_argument("--threshold", type=float, default=0.8, help="stop drafting below this top-1 probability")
    gen.add_argument("--max-draft-tokens", type=int, default=12)
    gen.add_argument("--adaptive", action="store_true", help="adapt the threshold to acceptance (Draft&Verify)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--compare-ar", action="store_true", help="also run plain decoding and report the speedup")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA)")
    gen.set_defaults(handler=run_generate)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from knnssd.generation import GenerateRequest, generate_text

    request = GenerateRequest(
        model=args.model, prompt=args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
        skip_set=args.skip_set, threshold=args.threshold, max_draft_tokens=args.max_draft_tokens,
        adaptive=args.adaptive, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        compare_ar=args.compare_ar, device=args.device, dtype=args.dtype,
    )
    report = generate_text(request)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    stats = report["stats"]
    lines = [report["text"], "", f"drafter: {report['drafter']['kind']}",
             f"new tokens {stats['new_tokens']}  ({report['finish_reason']}), {stats['tokens_per_second']:.1f} tok/s, "
             f"mean accepted tokens {stats['mean_accepted_tokens']:.2f}, acceptance rate {stats['acceptance_rate']:.2f}"]
    if "speedup" in report:
        lines.append(f"plain decoding {report['ar_tokens_per_second']:.1f} tok/s; speedup {report['speedup']:.2f}x; "
                     f"identical tokens: {report['identical_to_ar']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars would bury the one-line report or error
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KnnSsdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
