"""Plain vs self-speculative decoding on Spec-Bench, per category, with the ceiling each run allows.

For every prompt, plain decoding and each drafter (a draft policy: layer-skip sets, prompt lookup, the hybrid)
run back to back (interleaved, so machine drift hits all alike), greedy, and are checked token-identical.
Per category and drafter it prints:

  speedup   = sum of plain seconds / sum of self-speculative seconds (same prompts, same run)
  mat       = mean accepted tokens per verification step, bonus token counted
  alpha     = acceptance rate = accepted drafts / drafted tokens
  gamma     = mean drafted tokens per verification step
  f         = draft forward passes per verification step (a draft stopped by the threshold may cost one
              more forward than the tokens it proposes)
  c         = cost of one draft forward / cost of one plain decoding step
  v         = cost of one verification step / cost of one plain decoding step
  ceiling   = (1 - alpha^(gamma+1)) / ((1 - alpha) * (f * c + v))
              the expected tokens per step of Leviathan et al. (i.i.d. acceptance alpha, gamma drafts) over
              the measured cost of a step: what these acceptance and cost figures allow, so the gap between
              ceiling and speedup is the loop's own overhead
  leviathan = (1 - alpha^(gamma+1)) / ((1 - alpha) * (gamma * c + 1)), the paper's formula (no extra
              forward, a verify step costing one plain step)

    python benchmarks/bench_engine.py --per-category 2 --max-new-tokens 64 [--no-fast-kernels] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import load_spec_bench, machine_description, pick_prompts  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, generate, warm_up  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.policy import drafter_from_policy  # noqa: E402
from knnssd.engine.prompts import encode_prompt  # noqa: E402

ALL_CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag", "writing", "roleplay", "reasoning",
                  "math", "coding", "extraction", "stem", "humanities")
# For SmolLM2-135M: the first steps of benchmarks/proxy_skip_search.py (results/proxy_search.log), the four top
# attention sub-layers, half of all attention sub-layers (the paper's sets skip 35-50% of sub-layers), prompt
# lookup, and the hybrid of lookup and the best set.
DEFAULT_SKIP_SETS = {
    "proxy-1": {"attn": [25], "mlp": []},
    "proxy-3": {"attn": [4, 6, 25], "mlp": []},
    "attn-top4": {"attn": [26, 27, 28, 29], "mlp": []},
    "attn-half": {"attn": list(range(15, 30)), "mlp": []},
}
DEFAULT_POLICIES = {
    **{name: {"kind": "layer_skip", "skip_set": skip} for name, skip in DEFAULT_SKIP_SETS.items()},
    "lookup": {"kind": "prompt_lookup"},
    "hybrid": {"kind": "hybrid", "prompt_lookup": {}, "layer_skip": {"skip_set": DEFAULT_SKIP_SETS["proxy-1"]}},
}


def ceiling(alpha: float, gamma: float, forwards: float, c: float, v: float) -> float:
    """Expected tokens per step (Leviathan et al.) over the cost of a step, in plain-step units."""
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (forwards * c + v)


def summarise(runs: list[dict]) -> dict[str, float]:
    """Pool one category's runs of one method into the figures of the module docstring."""
    plain_s = sum(r["plain_seconds"] for r in runs)
    ssd_s = sum(r["seconds"] for r in runs)
    step = sum(r["plain_verify_seconds"] for r in runs) / sum(r["plain_steps"] for r in runs)
    drafted = sum(r["drafted"] for r in runs)
    accepted = sum(r["accepted"] for r in runs)
    steps = sum(r["steps"] for r in runs)
    forwards = sum(r["draft_forwards"] for r in runs)
    alpha = accepted / drafted if drafted else 0.0
    gamma = drafted / steps
    c = (sum(r["draft_seconds"] for r in runs) / forwards / step) if forwards else 0.0
    v = sum(r["verify_seconds"] for r in runs) / steps / step
    f = forwards / steps
    return {"speedup": plain_s / ssd_s, "mat": (accepted + steps) / steps, "alpha": alpha, "gamma": gamma,
            "f": f, "c": c, "v": v, "ceiling": ceiling(alpha, gamma, f, c, v),
            "leviathan": ceiling(alpha, gamma, gamma, c, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default ../shared/data/...)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--categories", default=",".join(ALL_CATEGORIES))
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--policies", default=None,
                        help="JSON file or inline JSON {name: draft policy}; default: built-in candidates")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--no-fast-kernels", action="store_true", help="transformers' own linear layers")
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    args = parser.parse_args()

    policies = DEFAULT_POLICIES
    if args.policies:
        policies = json.loads(args.policies if args.policies.strip().startswith("{") else Path(args.policies).read_text())
    loaded = load_model(args.model, device="cpu", dtype="float32", threads=args.threads,
                        fast_kernels=not args.no_fast_kernels)
    print(f"{loaded.name}, {loaded.threads} threads, kernels: {loaded.kernels.describe()}")
    drafters = {name: drafter_from_policy(policy, loaded.num_layers) for name, policy in policies.items()}
    prompts = pick_prompts(load_spec_bench(args.data), args.categories.split(","), args.per_category)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    warm_up(loaded.model, encode_prompt(loaded.tokenizer, "warm up", chat=True))
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    mismatches = 0
    for index, (category, text) in enumerate(prompts):
        ids = encode_prompt(loaded.tokenizer, text, chat=True)
        plain = generate(loaded.model, ids, config)
        for name, drafter in drafters.items():
            result = generate(loaded.model, ids, config, drafter)
            mismatches += result.token_ids != plain.token_ids
            s = result.stats
            runs[(category, name)].append({
                "plain_seconds": plain.stats.total_seconds, "plain_verify_seconds": plain.stats.verify_seconds,
                "plain_steps": plain.stats.verify_steps, "seconds": s.total_seconds, "drafted": s.drafted_tokens,
                "accepted": s.accepted_tokens, "steps": s.verify_steps, "draft_forwards": s.draft_forwards,
                "draft_seconds": s.draft_seconds, "verify_seconds": s.verify_seconds})
        print(f"[{index + 1}/{len(prompts)}] {category}: {ids.shape[1]} prompt tokens, "
              f"plain {plain.stats.tokens_per_second:.1f} tok/s", flush=True)

    header = f"{'category':<15}{'drafter':<12}{'speedup':>8}{'mat':>6}{'alpha':>7}{'gamma':>7}{'f':>6}{'c':>6}{'v':>6}" \
             f"{'ceiling':>9}{'leviathan':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    table = []
    categories = list(dict.fromkeys(category for category, _ in prompts))
    for name in drafters:
        for category in categories + ["overall"]:
            pool = [r for (cat, n), rs in runs.items() if n == name and cat in (category, *(
                categories if category == "overall" else ())) for r in rs]
            row = {"category": category, "drafter": name, **summarise(pool)}
            table.append(row)
            print(f"{category:<15}{name:<12}{row['speedup']:>8.2f}{row['mat']:>6.2f}{row['alpha']:>7.2f}"
                  f"{row['gamma']:>7.2f}{row['f']:>6.2f}{row['c']:>6.2f}{row['v']:>6.2f}{row['ceiling']:>9.2f}{row['leviathan']:>10.2f}")
    print(f"\ntoken mismatches against plain decoding: {mismatches} of {len(prompts) * len(drafters)} runs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "machine": machine_description(), "policies": policies,
        "kernels": loaded.kernels.describe(),
        "rows": table, "mismatches": mismatches}, indent=2))
    if mismatches:
        raise SystemExit("error: some runs were not token-identical to plain decoding")


if __name__ == "__main__":
    main()
