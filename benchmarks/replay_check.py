"""How far calibration's trial score is from the real thing: replayed events vs the real loop, predicted speedup
vs wall clock, on Spec-Bench prompts.

    python benchmarks/replay_check.py [--per-category 1] [--store-per-category 3] [--max-new-tokens 32]
                                      [--repeats 9] [--policies NAME,...] [--out FILE.json]

A smoke run (one prompt, a coarse table, the recycling tree only):

    python benchmarks/replay_check.py --categories translation --store-per-category 0 --max-new-tokens 16 \
        --repeats 1 --policies tree+recycled

For every prompt: plain decoding (traced), then each policy through the real decoding loop, timed between two
plain runs, and the same policy replayed (`pipeline.replay`) and priced with a step-cost table timed here first
(`pipeline.costs`). The policies: layer skipping, prompt lookup, a hybrid, and suffix trees without and with a
store ("tree", "tree+store") and with recycled successors ("tree+recycled": replayed from the successors the
trace records on an untimed plain run, `pipeline.traces.with_successors`); a category's store is the model's greedy outputs of `--store-per-category` other
prompts of that category (never a measured one, as calibration leaves a prompt's own output out). Reported per
policy, pooled over prompts:

    accepted error   (replayed accepted tokens - real) / real      (prompt lookup: 0 by construction)
    steps error      (replayed verify steps - real) / real
    drafted error    (replayed drafted tokens - real) / real       (tree nodes for a tree)
    widths equal     share of prompts whose verify widths (passes per width) equal the real run's, and
                     tree steps: real / replayed (passes whose draft was a tree)
    forwards error   (replayed draft forwards - real) / real       (what its layer-skip drafts are priced by;
                                                                    "-" where the real run had none)
    prediction error predicted speedup / wall-clock speedup - 1     (sum of plain / sum of policy seconds)

and the median |prediction error| over (prompt, policy) pairs and over policies pooled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_engine import ALL_CATEGORIES, DEFAULT_POLICIES  # noqa: E402
from benchmarks.common import load_spec_bench, machine_description, pick_prompts  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, generate, warm_up  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.policy import drafter_from_policy  # noqa: E402
from knnssd.engine.prompts import encode_prompt  # noqa: E402
from pipeline.costs import time_step_costs  # noqa: E402
from pipeline.drafting import uses_store  # noqa: E402
from pipeline.replay import full_cache, predict, replay, trace_prompt  # noqa: E402
from pipeline.scoring import policy_skip_set  # noqa: E402


def relative_error(rows: list[dict], event: str) -> float | None:
    """(replayed - real) / real of an event count pooled over `rows`; None where the real runs had none."""
    real = sum(r[f"real_{event}"] for r in rows)
    replayed = sum(r[f"replay_{event}"] for r in rows)
    return (replayed - real) / real if real else (None if replayed == 0 else float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="Spec-Bench question.jsonl")
    parser.add_argument("--categories", default=",".join(ALL_CATEGORIES))
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--store-per-category", type=int, default=3,
                        help="other prompts per category whose greedy outputs make the category's store.")
    parser.add_argument("--store-tokens", type=int, default=128, help="new tokens per store output.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9,
                        help="timings per entry of the step-cost table (the event counts do not depend on it).")
    parser.add_argument("--policies", default=None,
                        help="comma-separated names of the policies to check (default: all of them).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model, layers = loaded.model, loaded.num_layers
    policies = {**DEFAULT_POLICIES, "tree": {"kind": "suffix_tree"},
                "tree+store": {"kind": "suffix_tree", "use_store": True},
                "tree+recycled": {"kind": "suffix_tree", "recycled_nodes": 8, "recycled_k": 4}}
    if args.policies:
        unknown = [name for name in args.policies.split(",") if name not in policies]
        if unknown:
            parser.error(f"unknown policies {', '.join(unknown)}; choose from {', '.join(policies)}")
        policies = {name: policies[name] for name in args.policies.split(",")}
    categories = args.categories.split(",")
    picked = pick_prompts(load_spec_bench(args.data), categories,
                          args.per_category + args.store_per_category)
    prompts = [(c, t) for c in categories for t in [t for k, t in picked if k == c][:args.per_category]]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    warm_up(model, encode_prompt(loaded.tokenizer, "warm up", chat=True))
    stores = {category: [generate(model, encode_prompt(loaded.tokenizer, text, chat=True),
                                  GenerationConfig(max_new_tokens=args.store_tokens)).token_ids
                         for text in [t for k, t in picked if k == category][args.per_category:]]
              for category in categories}
    union = [array for arrays in stores.values() for array in arrays]  # store_scope union/both draft from it
    print(f"stores: {sum(len(a) for a in union)} tokens over {len(categories)} categories", flush=True)
    started = time.perf_counter()
    costs = time_step_costs(model, repeats=args.repeats)
    print(f"step costs timed in {time.perf_counter() - started:.0f} s: " +
          ", ".join(f"{k} {v:.2f}" for k, v in costs.relative().items()), flush=True)
    rows = []
    for index, (category, text) in enumerate(prompts):
        ids = encode_prompt(loaded.tokenizer, text, chat=True)
        trace = trace_prompt(model, ids, args.max_new_tokens)
        cache = full_cache(model, trace)
        for name, policy in policies.items():
            if uses_store(policy) and not stores[category]:
                continue  # --store-per-category 0
            drafter = drafter_from_policy(policy, layers, store=stores[category], union_store=union)
            skip = policy_skip_set(policy)
            before = generate(model, ids, config).stats.total_seconds
            real = generate(model, ids, config, drafter)
            after = generate(model, ids, config).stats.total_seconds
            replayed = replay(drafter, trace, predict(model, trace, cache, skip) if skip is not None else None)
            recorded = replayed.recorded()
            rows.append({"category": category, "policy": name, "prompt_tokens": ids.shape[1],
                         "plain_seconds": (before + after) / 2, "seconds": real.stats.total_seconds,
                         "predicted_plain_seconds": costs.plain_seconds(trace),
                         "predicted_seconds": costs.generation_seconds(trace, replayed, skip),
                         "real_accepted": real.stats.accepted_tokens, "replay_accepted": replayed.tally.accepted,
                         "real_steps": real.stats.verify_steps, "replay_steps": len(replayed.steps),
                         "real_drafted": real.stats.drafted_tokens, "replay_drafted": replayed.tally.drafted,
                         "real_forwards": real.stats.draft_forwards,
                         "replay_forwards": sum(step.forwards for step in replayed.steps),
                         "real_widths": list(real.stats.verify_widths), "real_tree_steps": real.stats.tree_steps,
                         "replay_widths": list(recorded.verify_widths), "replay_tree_steps": recorded.tree_steps,
                         "identical": real.token_ids == trace.tokens})
        print(f"[{index + 1}/{len(prompts)}] {category} ({ids.shape[1]} prompt tokens)", flush=True)
    summary = {}
    print(f"\n{'policy':<12}{'wall':>8}{'predicted':>10}{'error':>8}{'accepted err':>14}{'steps err':>11}"
          f"{'drafted err':>13}{'forwards err':>14}{'widths equal':>14}{'tree steps':>12}")
    for name in policies:
        mine = [r for r in rows if r["policy"] == name]
        if not mine:
            continue
        wall = sum(r["plain_seconds"] for r in mine) / sum(r["seconds"] for r in mine)
        predicted = sum(r["predicted_plain_seconds"] for r in mine) / sum(r["predicted_seconds"] for r in mine)
        real_accepted = sum(r["real_accepted"] for r in mine)
        accepted_error = (sum(r["replay_accepted"] for r in mine) - real_accepted) / max(1, real_accepted)
        steps_error = (sum(r["replay_steps"] for r in mine) - sum(r["real_steps"] for r in mine)) / sum(
            r["real_steps"] for r in mine)
        drafted_error = relative_error(mine, "drafted")
        forwards_error = relative_error(mine, "forwards")
        widths_equal = sum(r["real_widths"] == r["replay_widths"] for r in mine) / len(mine)
        trees = (sum(r["real_tree_steps"] for r in mine), sum(r["replay_tree_steps"] for r in mine))
        summary[name] = {"wall": wall, "predicted": predicted, "error": predicted / wall - 1,
                         "accepted_error": accepted_error, "steps_error": steps_error,
                         "drafted_error": drafted_error, "forwards_error": forwards_error,
                         "widths_equal": widths_equal, "real_tree_steps": trees[0], "replay_tree_steps": trees[1]}
        print(f"{name:<12}{wall:>8.3f}{predicted:>10.3f}{predicted / wall - 1:>+8.1%}{accepted_error:>+14.1%}"
              f"{steps_error:>+11.1%}{drafted_error:>+13.1%}"
              + (f"{forwards_error:>+14.1%}" if forwards_error is not None else f"{'-':>14}")
              + f"{widths_equal:>14.0%}{f'{trees[0]}/{trees[1]}':>12}")
    pair_errors = [abs((r["predicted_plain_seconds"] / r["predicted_seconds"]) /
                       (r["plain_seconds"] / r["seconds"]) - 1) for r in rows]
    pooled = statistics.median(abs(s["error"]) for s in summary.values())
    print(f"\nmedian |prediction error|: {statistics.median(pair_errors):.1%} per (prompt, policy), {pooled:.1%} per "
          f"policy pooled over {len(prompts)} prompts; all outputs identical to plain: "
          f"{all(r['identical'] for r in rows)}")
    print(machine_description())
    if args.out:
        Path(args.out).write_text(json.dumps({"costs": costs.to_dict(), "rows": rows, "summary": summary,
                                              "machine": machine_description()}, indent=2))


if __name__ == "__main__":
    main()
