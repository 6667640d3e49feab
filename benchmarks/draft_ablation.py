"""Issue 29's draft ablation, hardware-free: TOKENS PER VERIFY STEP of fixed token-tree policies on Spec-Bench's
held-out prompts, by exact replay (`pipeline.replay`), under the ablation axes recycling and store scope.

    python benchmarks/draft_ablation.py --model smollm2-135m [--threads 2] [--store-prompts 16] [--held-out 10]
        [--max-new-tokens 64] [--store-tokens 128] [--check 2] [--base JSON] [--frontier N+R,...] [--out DIR]

Data as calibration reads it with --merge-mt-bench (Spec-Bench's 8 MT-bench categories as "chat": 6 domains),
split with the same seed (`pipeline.data`). Per domain:

- a store: the model's plain greedy outputs of its first --store-prompts calibration prompts, --store-tokens each,
  with the loop's successor rows (`pipeline.store_decoding.decode_store`, as `pipeline.tasks.build_store`), hence
  its warm table; the union of every domain's store for store_scope "union"/"both";
- traces: plain greedy decoding of its first --held-out held-out prompts (decode_store with --max-new-tokens, then
  `pipeline.traces.store_traces`, as `pipeline.tasks.search_workload`), successors included. Held-out prompts are in
  no store (checked), so no output is left out of a store.

Every policy is replayed on every trace. Policies: the base suffix tree with the store (--base), the base with
recycled successors (cold, then from the domain's warm table), store scope own / union / both with and without
recycling + warm, and two references: the tree on the text only (no store) and prompt lookup (one path).

Figures (a verify step commits its accepted tokens plus the bonus token; the prefill's token is no step's):
  tokens/step   (accepted + steps) / steps, pooled over prompts (a domain's, or all of them: "overall"), with a
                95% paired bootstrap interval over prompts for the overall figure (`pipeline.bootstrap`)
  width         mean verify width (tokens in a verify pass: the last committed token + drafted nodes)
  no-draft      share of verify steps with no draft at all
These are what Spec-Bench tables compare as "mean accepted tokens"; they need no timing, so any machine gives the
same figures for the same model and kernels. --check N also decodes the first N held-out prompts with the real
loop (`knnssd.engine.decoding.generate`) under every policy and asserts the same output, verify steps and accepted
tokens as replay (where plain decoding stopped at EOS a real pass may count draft tokens past it as accepted,
`pipeline.replay`'s one departure: there the loop's count may only be larger).

--out DIR writes summary.json, per_prompt.csv and tokens_per_step.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import chosen_names, machine_description, spec_bench_file  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, generate, model_eos_ids  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.drafters import SuffixStore  # noqa: E402
from knnssd.engine.kernels import MAX_FAST_ROWS  # noqa: E402
from knnssd.engine.policy import (describe_policy, drafter_from_policy, parse_policy,  # noqa: E402
                                  suffix_tree_config)
from knnssd.engine.prompts import encode_prompt  # noqa: E402
from knnssd.errors import KnnSsdError  # noqa: E402
from pipeline.bootstrap import Interval, speedup_interval  # noqa: E402
from pipeline.data import (CALIBRATION, HELD_OUT, SPEC_BENCH_MT_CATEGORIES, DataConfig, domains_of,  # noqa: E402
                           load_calibration_table, normalise_prompt, prompts_of)
from pipeline.replay import Replayed, replay  # noqa: E402
from pipeline.store_decoding import decode_store  # noqa: E402
from pipeline.stores import DomainStore  # noqa: E402
from pipeline.successors import model_vocab  # noqa: E402
from pipeline.traces import Trace, store_traces  # noqa: E402

BASE_POLICY = {"kind": "suffix_tree", "use_store": True, "max_tree_nodes": 8, "max_depth": 6, "min_path_prob": 0.05}
RECYCLED = {"recycled_nodes": 8}
WARM = {"recycled_nodes": 8, "use_warm": True}
REFERENCE_LOOKUP = {"kind": "prompt_lookup"}
FRONTIER = {"store_scope": "both", "max_depth": 10, "min_path_prob": 0.02}  # --frontier's trees


def frontier_policies(base: dict[str, Any], budgets: str) -> dict[str, dict[str, Any]]:
    """Name -> policy for --frontier "N+R,...": the base with both stores and the warm table, at most N matched
    and R recycled nodes (a verify width of at most 1 + N + R), depth <= 10, path probability >= 0.02: the tokens a
    step that larger trees of the same sources reach, whatever their width costs."""
    policies = {}
    for budget in budgets.split(","):
        parts = budget.strip().split("+")
        try:
            matched, recycled = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
        except ValueError:
            matched, recycled = -1, -1
        if len(parts) > 2 or matched < 1 or recycled < 0 or matched + recycled > MAX_FAST_ROWS - 1:
            raise KnnSsdError(f"--frontier: {budget.strip()!r} is not N+R with N >= 1, R >= 0, "
                              f"N + R <= {MAX_FAST_ROWS - 1}",
                              fix=f"pass e.g. --frontier 4+0,8+8,16+15 (matched + recycled nodes; a pass holds "
                                  f"at most {MAX_FAST_ROWS} tokens: the last one and the draft)")
        policies[f"frontier {matched}+{recycled}"] = {
            **base, **FRONTIER, "use_store": True, "max_tree_nodes": matched, "recycled_nodes": recycled,
            "use_warm": recycled > 0}
    return policies


def ablation_policies(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> policy: the ablation's variants of `base` (a suffix tree; its use_store and store_scope are set
    per variant), in table order."""
    if base.get("kind") != "suffix_tree":
        raise KnnSsdError(f"--base must be a suffix_tree policy, got kind {base.get('kind')!r}",
                          fix='pass e.g. --base \'{"kind": "suffix_tree", "max_tree_nodes": 8}\'')
    stored = {**base, "use_store": True}
    return {
        "prompt lookup": dict(REFERENCE_LOOKUP),
        "text only": {**base, "use_store": False, "store_scope": "own"},
        "own": {**stored, "store_scope": "own"},
        "own +recycled": {**stored, "store_scope": "own", **RECYCLED},
        "own +recycled+warm": {**stored, "store_scope": "own", **WARM},
        "union": {**stored, "store_scope": "union"},
        "union +recycled+warm": {**stored, "store_scope": "union", **WARM},
        "both": {**stored, "store_scope": "both"},
        "both +recycled+warm": {**stored, "store_scope": "both", **WARM},
    }


@dataclass(frozen=True)
class PromptResult:
    """One policy replayed on one held-out prompt: new tokens committed by verify steps (accepted + bonus),
    verify steps, tokens in all verify passes, steps with no draft."""

    policy: str
    domain: str
    prompt: int
    tokens: int
    steps: int
    width_sum: int
    no_draft: int

    @classmethod
    def of(cls, policy: str, domain: str, prompt: int, replayed: Replayed) -> "PromptResult":
        tally = replayed.tally
        return cls(policy=policy, domain=domain, prompt=prompt, tokens=tally.accepted + tally.steps,
                   steps=tally.steps, width_sum=sum(s.width for s in replayed.steps),
                   no_draft=sum(1 for s in replayed.steps if s.drafted == 0))


def pooled(rows: Sequence[PromptResult]) -> dict[str, float]:
    """tokens per step, mean verify width and no-draft share pooled over `rows` (by steps)."""
    steps = sum(r.steps for r in rows)
    if steps == 0:
        return {"tokens_per_step": float("nan"), "mean_width": float("nan"), "no_draft_share": float("nan")}
    return {"tokens_per_step": sum(r.tokens for r in rows) / steps,
            "mean_width": sum(r.width_sum for r in rows) / steps,
            "no_draft_share": sum(r.no_draft for r in rows) / steps}


def tokens_interval(rows: Sequence[PromptResult], seed: int) -> Interval:
    """sum(tokens) / sum(steps) over prompts with its 95% bootstrap interval (prompts drawn with replacement,
    the same draws for every policy: `speedup_interval` is exactly that ratio of sums)."""
    kept = [r for r in rows if r.steps]
    return speedup_interval([r.tokens for r in kept], [r.steps for r in kept], seed=seed)


def check_against_loop(model: Any, ids: Any, trace: Trace, drafter: Any, replayed: Replayed, name: str) -> None:
    """Decode `ids` with `drafter` in the real loop; refuse any difference from the trace and the replay."""
    real = generate(model, ids, GenerationConfig(max_new_tokens=trace.max_new_tokens), drafter)
    tally = replayed.tally
    at_eos = bool(trace.tokens) and trace.tokens[-1] in set(model_eos_ids(model))
    problems = []
    if real.token_ids != trace.tokens:
        problems.append("the output differs from plain decoding's")
    if real.stats.verify_steps != tally.steps:
        problems.append(f"verify steps {real.stats.verify_steps} (loop) vs {tally.steps} (replay)")
    if real.stats.accepted_tokens != tally.accepted and not (at_eos and real.stats.accepted_tokens > tally.accepted):
        problems.append(f"accepted tokens {real.stats.accepted_tokens} (loop) vs {tally.accepted} (replay)")
    if problems:
        raise KnnSsdError(f"--check: policy {name!r}: replay is not the loop here: {'; '.join(problems)}",
                          fix="run with deterministic, batch-invariant kernels (fp32 on CPU with the engine's "
                              "kernels), or report this as a replay bug")


def build_stores(model: Any, encode: Any, table: Any, domains: list[str], count: int, tokens: int, batch: int,
                 invariant: bool) -> dict[str, DomainStore]:
    stores = {}
    for domain in domains:
        texts = prompts_of(table, domain, CALIBRATION)[:count]
        started = time.perf_counter()
        decoded = decode_store(model, [encode(t) for t in texts], tokens, batch, invariant)
        stores[domain] = DomainStore(domain=domain, prompts=tuple(texts), outputs=decoded.outputs,
                                     successors=decoded.successors, vocab=model_vocab(model))
        print(f"store {domain}: {len(texts)} prompts, {stores[domain].tokens} tokens "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    return stores


def build_traces(model: Any, encode: Any, table: Any, domains: list[str], count: int, max_new_tokens: int,
                 batch: int, invariant: bool) -> dict[str, list[tuple[str, Any, Trace]]]:
    """domain -> (text, ids, trace) of its first `count` held-out prompts."""
    traces = {}
    for domain in domains:
        texts = prompts_of(table, domain, HELD_OUT)[:count]
        ids = [encode(t) for t in texts]
        started = time.perf_counter()
        decoded = decode_store(model, ids, max_new_tokens, batch, invariant)
        made = store_traces(model, ids, decoded.outputs, decoded.successors, max_new_tokens)
        if any(t is None for t in made):  # decoded with this very budget: cannot happen
            raise RuntimeError(f"{domain}: a held-out output is shorter than its budget without an EOS")
        traces[domain] = list(zip(texts, ids, made))
        print(f"traces {domain}: {len(texts)} held-out prompts, {sum(len(t.tokens) for t in made)} tokens "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    return traces


def check_held_out(stores: dict[str, DomainStore], traces: dict[str, list]) -> None:
    stored = {normalise_prompt(p) for store in stores.values() for p in store.prompts}
    leaked = [text for items in traces.values() for text, _, _ in items if normalise_prompt(text) in stored]
    if leaked:
        raise KnnSsdError(f"{len(leaked)} held-out prompts are also store prompts (e.g. {leaked[0][:60]!r})",
                          fix="this is a bug in the split: held-out prompts must be in no store")


def summarise(results: list[PromptResult], policies: dict[str, dict[str, Any]], domains: list[str],
              seed: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, policy in policies.items():
        rows = [r for r in results if r.policy == name]
        overall = pooled(rows)
        interval = tokens_interval(rows, seed) if any(r.steps for r in rows) else None
        summary[name] = {"policy": policy, "describe": describe_policy(policy), **overall,
                         "ci95": None if interval is None else [interval.low, interval.high],
                         "prompts": len(rows),
                         "domains": {d: pooled([r for r in rows if r.domain == d]) for d in domains}}
    return summary


def print_table(summary: dict[str, Any], domains: list[str]) -> None:
    name_width = max(len(n) for n in summary)
    head = f"{'policy':<{name_width}} " + " ".join(f"{d[:10]:>10}" for d in domains)
    print(f"\ntokens per verify step (accepted + 1), pooled over prompts\n{head} {'overall':>8} "
          f"{'95% CI':>15} {'width':>6} {'no-draft':>8}")
    for name, row in summary.items():
        ci = row["ci95"]
        print(f"{name:<{name_width}} " + " ".join(f"{row['domains'][d]['tokens_per_step']:>10.3f}" for d in domains)
              + f" {row['tokens_per_step']:>8.3f} " + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{'-':>15}")
              + f" {row['mean_width']:>6.2f} {row['no_draft_share']:>8.1%}")
    print()
    for name, row in summary.items():
        print(f"  {name}: {row['describe']}")


def write_outputs(out: Path, summary: dict[str, Any], results: list[PromptResult], header: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({**header, "policies": summary}, indent=2))
    with open(out / "per_prompt.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["policy", "domain", "prompt", "tokens", "steps", "tokens_per_step", "mean_width",
                         "no_draft_steps"])
        for r in results:
            writer.writerow([r.policy, r.domain, r.prompt, r.tokens, r.steps,
                             f"{r.tokens / r.steps:.4f}" if r.steps else "", f"{r.width_sum / r.steps:.4f}"
                             if r.steps else "", r.no_draft])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no chart", flush=True)
        return
    names = list(summary)
    values = [summary[n]["tokens_per_step"] for n in names]
    errors = [[v - (summary[n]["ci95"] or [v, v])[0] for n, v in zip(names, values)],
              [(summary[n]["ci95"] or [v, v])[1] - v for n, v in zip(names, values)]]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    axes.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4c72b0")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylabel("tokens per verify step (95% CI)")
    axes.set_title(f"draft ablation: {Path(header['model']).name}, {header['prompts']} held-out prompts, "
                   f"{header['max_new_tokens']} new tokens")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    figure.tight_layout()
    figure.savefig(out / "tokens_per_step.png", dpi=120)
    plt.close(figure)


def policies_base(args: argparse.Namespace) -> dict[str, Any]:
    """The base suffix-tree policy: --base, else BASE_POLICY."""
    return parse_policy(args.base) if args.base else dict(BASE_POLICY)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a model name or a folder written by save_pretrained.")
    p.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: $KNNSSD_SPEC_BENCH, else "
                                               "../shared/data/spec_bench/question.jsonl beside the repo).")
    p.add_argument("--seed", type=int, default=0, help="the data split's seed (calibration's default: 0).")
    p.add_argument("--held-out-fraction", type=float, default=DataConfig.held_out_fraction,
                   help="as calibration's flag (the split must be calibration's).")
    p.add_argument("--store-prompts", type=int, default=16, help="calibration prompts per domain in its store.")
    p.add_argument("--held-out", type=int, default=10, help="held-out prompts per domain measured.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--store-tokens", type=int, default=128, help="new tokens per store output.")
    p.add_argument("--store-batch", type=int, default=8, help="prompts decoded together for stores and traces.")
    p.add_argument("--base", default=None, help=f"the base suffix-tree policy (JSON or a file; default "
                                                f"{json.dumps(BASE_POLICY)}).")
    p.add_argument("--policies", default=None, help="comma-separated policy names to run (default: all).")
    p.add_argument("--frontier", default=None, metavar="N+R,...",
                   help="also replay larger trees: both stores, the warm table, at most N matched and R recycled "
                        "nodes each (e.g. 4+0,8+8,16+15); tokens a step against verify width.")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="also decode the first N held-out prompts (over all domains) with the real loop under "
                        "every policy and assert replay's output, steps and accepted tokens.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's).")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template to prompts.")
    p.add_argument("--out", default=None, metavar="DIR", help="write summary.json, per_prompt.csv, a PNG chart.")
    return p


def spec_bench_split(path: str | None, held_out_fraction: float, seed: int) -> Any:
    """Spec-Bench (`path`, or the default file) split as calibration splits it with --merge-mt-bench."""
    data = DataConfig(path=str(spec_bench_file(path)), merge={c: "chat" for c in SPEC_BENCH_MT_CATEGORIES},
                      held_out_fraction=held_out_fraction, seed=seed)
    return load_calibration_table(data)


def load_for_replay(name: str, threads: int) -> tuple[Any, bool]:
    """The model (`load_model`) and whether its kernels are batch-invariant; prints the machine line."""
    loaded = load_model(name, threads=threads)
    print(f"machine: {machine_description()}", flush=True)
    return loaded, loaded.kernels is not None and loaded.kernels.batch_invariant


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the ablation; returns what summary.json holds."""
    args = build_parser().parse_args(argv)
    for flag in ("store_prompts", "held_out", "max_new_tokens", "store_tokens", "store_batch"):
        if getattr(args, flag) < 1:
            raise KnnSsdError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}",
                              fix="pass a positive number")
    policies = ablation_policies(policies_base(args))
    policies = {n: policies[n] for n in chosen_names("--policies", args.policies, list(policies))}
    if args.frontier:
        policies.update(frontier_policies(policies_base(args), args.frontier))
    table = spec_bench_split(args.data, args.held_out_fraction, args.seed)
    domains = domains_of(table)
    loaded, invariant = load_for_replay(args.model, args.threads)
    model = loaded.model
    print(f"model {args.model}, {len(domains)} domains ({', '.join(domains)}), batch-invariant kernels: "
          f"{invariant}", flush=True)

    def encode(text: str):
        return encode_prompt(loaded.tokenizer, text, chat=not args.no_chat)

    started = time.perf_counter()
    stores = build_stores(model, encode, table, domains, args.store_prompts, args.store_tokens, args.store_batch,
                          invariant)
    union = DomainStore.union(stores.values(), "union")
    traces = build_traces(model, encode, table, domains, args.held_out, args.max_new_tokens, args.store_batch,
                          invariant)
    check_held_out(stores, traces)
    order = [(d, i) for i in range(max(len(v) for v in traces.values())) for d in domains if i < len(traces[d])]
    to_check = set(order[:args.check])  # the first N, domains in turn
    # every variant matches the base's n-gram sizes: index each store once, build each warm table once
    tree = suffix_tree_config(policies_base(args))
    own_index = {d: SuffixStore.of(stores[d].arrays(), tree) for d in domains}
    union_index = SuffixStore.of(union.arrays(), tree)
    tables = {d: stores[d].table() for d in domains}
    results: list[PromptResult] = []
    for name, policy in policies.items():
        policy_started = time.perf_counter()
        for domain in domains:
            drafter = drafter_from_policy(policy, loaded.num_layers, store=own_index[domain],
                                          successors=tables[domain], union_store=union_index)
            for index, (_, ids, trace) in enumerate(traces[domain]):
                replayed = replay(drafter, trace)
                if (domain, index) in to_check:
                    check_against_loop(model, ids, trace, drafter, replayed, name)
                results.append(PromptResult.of(name, domain, index, replayed))
        figures = pooled([r for r in results if r.policy == name])
        print(f"policy {name}: {figures['tokens_per_step']:.3f} tokens/step "
              f"({time.perf_counter() - policy_started:.1f} s{', checked' if to_check else ''})", flush=True)
    summary = summarise(results, policies, domains, args.seed)
    header = {"model": args.model, "machine": machine_description(), "domains": domains,
              "prompts": sum(len(v) for v in traces.values()), "held_out_per_domain": args.held_out,
              "store_prompts_per_domain": args.store_prompts, "store_tokens": args.store_tokens,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "checked_prompts": len(to_check),
              "batch_invariant": invariant, "seconds": time.perf_counter() - started}
    print_table(summary, domains)
    if args.out:
        write_outputs(Path(args.out), summary, results, header)
        print(f"wrote {args.out}/summary.json, per_prompt.csv", flush=True)
    return {**header, "policies": summary}


if __name__ == "__main__":
    try:
        main()
    except KnnSsdError as error:
        raise SystemExit(f"error: {error}") from None
