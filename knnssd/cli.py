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
    gen.add_argument("--model", help="Hugging Face id, local folder, or built-in name (smollm2-135m); "
                                     "with --bundle, default the bundle's model")
    gen.add_argument("--bundle", help="route with a bundle: NAME, NAME@vN, NAME@ALIAS, NAME@latest, or a folder")
    gen.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    gen.add_argument("--allow-model-mismatch", action="store_true",
                     help="use a bundle although --model's hash differs from the bundle's model")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--skip-set", help='JSON {"attn": [...], "mlp": [...]} or a path to a JSON file; '
                                        "without it, plain decoding")
    gen.add_argument("--policy", help='a whole draft policy as JSON or a file: {"kind": "prompt_lookup", '
                     '"max_ngram": 3, "max_draft_tokens": 10}, {"kind": "hybrid", ...}; see knnssd/policy.py')
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
    bundles = commands.add_parser("bundles", help="routing bundles in the MLflow registry")
    bundle_commands = bundles.add_subparsers(dest="bundle_command", required=True)
    listing = bundle_commands.add_parser("list", help="registered bundles, or the versions of one")
    listing.add_argument("name", nargs="?")
    listing.add_argument("--tracking-uri")
    listing.set_defaults(handler=run_bundles_list)
    show = bundle_commands.add_parser("show", help="a bundle's manifest: domains, policies, metrics")
    show.add_argument("ref", help="NAME@vN, NAME@ALIAS, NAME, or a bundle folder")
    show.add_argument("--tracking-uri")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=run_bundles_show)
    return parser


def run_bundles_list(args: argparse.Namespace) -> int:
    from registry.mlflow_store import BundleRegistry

    registry = BundleRegistry(args.tracking_uri)
    if args.name is None:
        names = registry.names()
        print("\n".join(names) if names else f"no bundles registered in {registry.tracking_uri}")
        return 0
    print(f"{'version':<9}{'aliases':<20}{'model hash':<14}run")
    for row in registry.versions(args.name):
        print(f"v{row['version']:<8}{','.join(row['aliases']) or '-':<20}{(row['model_hash'] or '-')[:12]:<14}"
              f"{row['run_id']}")
    return 0


def run_bundles_show(args: argparse.Namespace) -> int:
    from knnssd.policy import describe_policy
    from knnssd.runtime import fetch_bundle
    from registry.bundle import read_bundle

    bundle = read_bundle(fetch_bundle(args.ref, args.tracking_uri))
    manifest = bundle.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"bundle {args.ref}: model {manifest['model_id']} (hash {manifest['model_hash'][:12]}), "
          f"created {manifest['created_at']}, knnssd {manifest['package_version']}")
    print(f"fallback beyond cosine distance {manifest['routing']['fallback_distance']:.4f}: "
          f"{describe_policy(manifest['fallback_policy'])}")
    print(f"\n{'domain':<16}{'anchors':>8}{'speedup':>9}{'mat':>6}{'accept':>8}{'trials':>8}  policy")
    rows = [(d["name"], d["anchors"], d["metrics"], d["policy"]) for d in manifest["domains"]]
    rows += [(f"({name})", 0, ref.get("metrics", {}), ref.get("policy", {}))
             for name, ref in manifest.get("reference_policies", {}).items()]
    for name, anchors, m, policy in rows:
        print(f"{name:<16}{anchors:>8}{m.get('speedup', float('nan')):>9.2f}"
              f"{m.get('mean_accepted_tokens', float('nan')):>6.2f}{m.get('acceptance_rate', float('nan')):>8.2f}"
              f"{int(m.get('trials', 0)):>8}  {describe_policy(policy)}")
    if manifest.get("reference_policies"):
        print("(rows in parentheses: reference policies searched for comparison, never routed to)")
    print("speedup, mat (mean accepted tokens per step), accept (acceptance rate): the chosen policy's calibration "
          "trial")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from knnssd.generation import GenerateRequest, generate_text

    request = GenerateRequest(
        model=args.model, prompt=args.prompt, bundle=args.bundle, tracking_uri=args.tracking_uri,
        allow_model_mismatch=args.allow_model_mismatch, chat=args.chat, max_new_tokens=args.max_new_tokens,
        skip_set=args.skip_set, policy=args.policy, threshold=args.threshold, max_draft_tokens=args.max_draft_tokens,
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
