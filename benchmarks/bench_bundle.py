"""A calibrated bundle on its held-out prompts: routing accuracy, routing overhead, routed losslessness, and
each domain's skip set against every other domain's (does a domain's own set win on its own prompts?).

    python benchmarks/bench_bundle.py --bundle calibration/specbench/bundles/<folder> \
        --data calibration/specbench/data.parquet --per-domain 2 --max-new-tokens 48

Figures:
  routing accuracy  = held-out prompts routed to their own domain / held-out prompts
  routing overhead  = (mean-pooling of the prefill's hidden states + FAISS search) / a whole generation's time
  cross speedup     = plain seconds / self-speculative seconds, summed over a domain's held-out prompts
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, generate, prefill  # noqa: E402
from knnssd.engine.policy import drafter_from_policy  # noqa: E402
from knnssd.bundle.runtime import load_bundle  # noqa: E402
from knnssd.engine.sampling import SamplingConfig  # noqa: E402
from pipeline.data import HELD_OUT, domains_of, prompts_of  # noqa: E402


def routing_accuracy(runtime, table) -> tuple[dict[str, float], Counter, int]:
    """Per-domain accuracy of nearest-anchor routing over every held-out prompt, the confusion counts, and
    the number of fallbacks."""
    confusion: Counter = Counter()
    fallbacks = 0
    for domain in domains_of(table):
        for text in prompts_of(table, domain, HELD_OUT):
            ids = runtime.encode(text)
            state = prefill(runtime.loaded.model, ids, SamplingConfig(), None, time.perf_counter)
            route = runtime.router.route(state.embedding)
            confusion[(domain, route.domain)] += 1
            fallbacks += route.fallback
    accuracy = {}
    for domain in domains_of(table):
        total = sum(n for (true, _), n in confusion.items() if true == domain)
        accuracy[domain] = confusion[(domain, domain)] / total
    return accuracy, confusion, fallbacks


def pooling_seconds(runtime, length: int, repeats: int = 50) -> float:
    """Median time of mean-pooling a (length, hidden) final hidden state, the embedding's only cost."""
    hidden = torch.randn(1, length, runtime.loaded.model.config.hidden_size)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hidden[0].float().mean(dim=0)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle folder or registry reference")
    parser.add_argument("--data", required=True, help="the calibration's data.parquet (holds the split)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--per-domain", type=int, default=2, help="held-out prompts per domain for speed")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/bundle.json")
    args = parser.parse_args()

    runtime = load_bundle(args.bundle, tracking_uri=args.tracking_uri, device="cpu", dtype="float32")
    table = pq.read_table(args.data)
    domains = domains_of(table)
    accuracy, confusion, fallbacks = routing_accuracy(runtime, table)
    held_total = sum(confusion.values())
    overall = sum(confusion[(d, d)] for d in domains) / held_total
    print(f"routing accuracy over {held_total} held-out prompts: {overall:.3f} ({fallbacks} fallbacks)")
    for domain in domains:
        wrong = {p: n for (t, p), n in confusion.items() if t == domain and p != domain}
        print(f"  {domain:<16}{accuracy[domain]:.3f}  misrouted to: {wrong or '-'}")

    model = runtime.loaded.model
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    layers = runtime.loaded.num_layers
    drafters = {d: drafter_from_policy(runtime.bundle.policies[d], layers) for d in domains}
    generate(model, runtime.encode("warm up"), GenerationConfig(max_new_tokens=4))
    plain_s = {d: 0.0 for d in domains}
    cross = {(d, s): 0.0 for d in domains for s in domains}
    routed_s = {d: 0.0 for d in domains}
    overhead, mismatches, runs = [], 0, 0
    for domain in domains:
        for text in prompts_of(table, domain, HELD_OUT)[: args.per_domain]:
            ids = runtime.encode(text)
            plain = generate(model, ids, config)
            plain_s[domain] += plain.stats.total_seconds
            routed = runtime.generate(ids, max_new_tokens=args.max_new_tokens)
            routed_s[domain] += routed.result.stats.total_seconds
            pool = pooling_seconds(runtime, ids.shape[1])
            overhead.append((routed.routing_seconds + pool) / routed.result.stats.total_seconds)
            mismatches += routed.result.token_ids != plain.token_ids
            runs += 1
            seconds_by_policy: dict[str, float] = {}  # domains that share a policy share its run
            for source in domains:
                key = json.dumps(runtime.bundle.policies[source], sort_keys=True)
                if key not in seconds_by_policy:
                    result = generate(model, ids, config, drafters[source])
                    seconds_by_policy[key] = result.stats.total_seconds
                    mismatches += result.token_ids != plain.token_ids
                    runs += 1
                cross[(domain, source)] += seconds_by_policy[key]
        print(f"[{domain}] done", flush=True)

    print(f"\nrouting overhead: mean {100 * sum(overhead) / len(overhead):.4f}% of a {args.max_new_tokens}-token "
          f"generation (max {100 * max(overhead):.4f}%)")
    print(f"token mismatches against plain decoding: {mismatches} of {runs} runs")
    print("\nspeedup of each domain's skip set (columns) on each domain's held-out prompts (rows); * = best")
    print(f"{'prompts':<16}" + "".join(f"{s[:10]:>11}" for s in domains) + f"{'KNN-SSD':>10}")
    wins = 0
    for domain in domains:
        speedups = {s: plain_s[domain] / cross[(domain, s)] for s in domains}
        best = max(speedups, key=speedups.get)
        wins += best == domain
        cells = "".join(f"{speedups[s]:>10.2f}{'*' if s == best else ' '}" for s in domains)
        print(f"{domain:<16}{cells}{plain_s[domain] / routed_s[domain]:>10.2f}")
    distinct = len({json.dumps(runtime.bundle.policies[d], sort_keys=True) for d in domains})
    if distinct == 1:
        print("\nevery domain calibrated the same policy: the cross-domain comparison shows only noise")
    else:
        print(f"\nown skip set best on {wins} of {len(domains)} domains ({distinct} distinct policies)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "machine": machine_description(),
        "routing_accuracy": accuracy, "routing_accuracy_overall": overall, "fallbacks": fallbacks,
        "routing_overhead_mean": sum(overhead) / len(overhead), "routing_overhead_max": max(overhead),
        "mismatches": mismatches, "runs": runs,
        "cross_speedup": {f"{d}<-{s}": plain_s[d] / cross[(d, s)] for d in domains for s in domains},
        "knn_ssd_speedup": {d: plain_s[d] / routed_s[d] for d in domains}, "own_best": wins}, indent=2))


if __name__ == "__main__":
    main()
