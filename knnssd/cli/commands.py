"""The `knnssd` command line.

    knnssd generate --model smollm2-135m --prompt "Hi" --chat --skip-set '{"attn":[24],"mlp":[]}' --compare-ar --json
    knnssd bundles list | show REF | compare REF REF ... | alias REF ALIAS [--delete]   (knnssd/cli/bundles.py)
    knnssd keys generate --out PREFIX                         (a key pair that signs bundles, knnssd/bundle/signing.py)
    knnssd serve --bundle REF [--port 8000] ...               (see knnssd/cli/serve.py)

Bad input prints one line, ``error: <problem> (fix: <what to do>)``, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from knnssd.cli.bundles import add_commands as add_bundle_commands, add_key_commands
from knnssd.cli.entry import ArgumentParser, add_engine_flags, add_trusted_key_flag, run_main
from knnssd.cli.serve import add_command as add_serve_command


def build_parser() -> argparse.ArgumentParser:
    from knnssd.engine.drafters.layer_skip import LayerSkipConfig
    from knnssd.engine.sampling import SamplingConfig

    parser = ArgumentParser(prog="knnssd", description="KNN-SSD: dynamic self-speculative decoding.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text, plainly or with self-speculative drafting.")
    gen.add_argument("--model", help="Hugging Face id, local folder, or built-in name (smollm2-135m); "
                                     "with --bundle, default the bundle's model.")
    gen.add_argument("--bundle", help="route with a bundle: NAME, NAME@vN, NAME@ALIAS, NAME@latest, or a folder.")
    gen.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
    gen.add_argument("--allow-model-mismatch", action="store_true",
                     help="use a bundle although --model's hash differs from the bundle's model.")
    add_trusted_key_flag(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text.")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template.")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most.")
    gen.add_argument("--skip-set", help='JSON {"attn": [...], "mlp": [...]} or a path to a JSON file; '
                                        "without it, plain decoding.")
    gen.add_argument("--policy", help='a whole draft policy as JSON or a file: {"kind": "prompt_lookup", '
                     '"max_ngram": 3, "max_draft_tokens": 10}, {"kind": "hybrid", ...}, {"kind": "suffix_tree", '
                     '"max_tree_nodes": 15} (a token tree); see knnssd/engine/policy.py.')
    gen.add_argument("--threshold", type=float, default=LayerSkipConfig.threshold,
                     help="with --skip-set: stop drafting below this top-1 probability.")
    gen.add_argument("--max-draft-tokens", type=int, default=LayerSkipConfig.max_draft_tokens,
                     help="with --skip-set: draft at most this many tokens per step.")
    gen.add_argument("--adaptive", action="store_true",
                     help="with --skip-set: adapt the threshold to acceptance (Draft&Verify).")
    gen.add_argument("--temperature", type=float, default=SamplingConfig.temperature, help="0 for greedy.")
    gen.add_argument("--top-p", type=float, default=SamplingConfig.top_p, help="nucleus sampling mass (1: off).")
    gen.add_argument("--top-k", type=int, default=SamplingConfig.top_k, help="sample among the k likeliest (0: off).")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling.")
    gen.add_argument("--compare-ar", action="store_true", help="also run plain decoding and report the speedup.")
    gen.add_argument("--json", action="store_true", help="print one JSON object.")
    add_engine_flags(gen, "generation")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA).")
    gen.set_defaults(handler=run_generate)
    add_bundle_commands(commands)
    add_key_commands(commands)
    add_serve_command(commands)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from knnssd.cli.generate import GenerateRequest, answer_request

    request = GenerateRequest(
        model=args.model, prompt=args.prompt, bundle=args.bundle, tracking_uri=args.tracking_uri,
        allow_model_mismatch=args.allow_model_mismatch, chat=args.chat, max_new_tokens=args.max_new_tokens,
        skip_set=args.skip_set, policy=args.policy, threshold=args.threshold, max_draft_tokens=args.max_draft_tokens,
        adaptive=args.adaptive, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        compare_ar=args.compare_ar, device=args.device, dtype=args.dtype, threads=args.threads,
        fast_kernels=not args.no_fast_kernels, trusted_keys=tuple(args.trusted_key) if args.trusted_key else None,
    )
    report = answer_request(request)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    stats = report["stats"]
    route = f" (bundle domain {report['domain']}, distance {report['distance']:.4f}" \
            f"{', fallback' if report['fallback'] else ''})" if "domain" in report else ""
    lines = [report["text"], "", f"drafter: {report['drafter']['kind']}{route}",
             f"new tokens {stats['new_tokens']}  ({report['finish_reason']}), {stats['tokens_per_second']:.1f} tok/s, "
             f"mean accepted tokens {stats['mean_accepted_tokens']:.2f}, acceptance rate {stats['acceptance_rate']:.2f}"]
    if "speedup" in report:
        lines.append(f"plain decoding {report['ar_tokens_per_second']:.1f} tok/s; speedup {report['speedup']:.2f}x; "
                     f"identical tokens: {report['identical_to_ar']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
