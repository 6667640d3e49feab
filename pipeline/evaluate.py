"""The domain-shift study: does routing keep the speedup that a fixed draft policy loses across domains?

On held-out prompts of every domain, one run measures, interleaved prompt by prompt (each prompt runs every
method back to back, in an order rotated from prompt to prompt, so machine drift hits all methods alike):

    plain            the decoding loop with no drafter: the denominator of every speedup
    fix-<domain>     Self-SD(Fix): that domain's calibrated policy for every prompt
    mix              Self-SD(Mix): one policy searched by the same pipeline on all domains' prompts together
                     (the bundle's reference policy "mix"; absent if calibration ran with --no-mix)
    knn              KNN-SSD: the bundle routes each prompt from its own prefill embedding (routing time counted)
    oracle           each prompt gets its true domain's policy
    <name>           any extra policy given by name (`EvalConfig.policies`), for every prompt: e.g. each
                     drafter kind alone
    hf-plain         transformers' own greedy `generate` (the peers' own baseline)
    hf-prompt-lookup transformers' assisted generation with prompt lookup (`prompt_lookup_num_tokens`)
    hf-early-exit    transformers' assisted generation with its early-exit assistant (`assistant_early_exit`)

Two streams: "task" (prompts grouped by domain, domain after domain) and "mixed" (the same prompts shuffled).
Figures per stream, method and domain (and "overall", pooled over every prompt of the stream):

    speedup       = sum of plain seconds / sum of the method's seconds, over the same prompts
    mean_accepted = (accepted + verify steps) / verify steps, pooled (our methods only)
    acceptance    = accepted / drafted, pooled (our methods only)
    identical     = fraction of prompts whose tokens equal plain decoding's
    routing_accuracy (knn) = fraction routed to the prompt's true domain (a fallback counts as a miss)
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from knnssd.decoding import GenerationConfig, device_clock, generate
from knnssd.errors import KnnSsdError
from knnssd.policy import drafter_from_policy

STREAMS = ("task", "mixed")
PEERS = ("hf-prompt-lookup", "hf-early-exit")
OVERALL = "overall"


@dataclass(frozen=True)
class EvalConfig:
    """max_new_tokens per generation; prompts_per_domain held-out prompts used per domain (None: all);
    fix_domains: whose policies run as Self-SD(Fix) (None: every domain's); peers: transformers' methods to
    time; lookup_tokens: their `prompt_lookup_num_tokens`; early_exit_layer: their `assistant_early_exit`
    (None: half the model's layers); policies: extra (name, draft policy) methods."""

    max_new_tokens: int = 64
    prompts_per_domain: int | None = None
    streams: tuple[str, ...] = STREAMS
    fix_domains: tuple[str, ...] | None = None
    peers: tuple[str, ...] = PEERS
    lookup_tokens: int = 10
    early_exit_layer: int | None = None
    seed: int = 0
    policies: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __post_init__(self) -> None:
        reserved = {"plain", "mix", "knn", "oracle", "hf-plain", *PEERS}
        for name, _ in self.policies:
            if name in reserved or name.startswith("fix-") or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise KnnSsdError(f"extra policy name {name!r} is taken by a built-in method or has characters "
                                  "other than letters, digits, '_', '.', '-'",
                                  fix="name it otherwise, e.g. --policy lookup-only='{\"kind\": \"prompt_lookup\"}'")
        for name, given, known in (("stream", self.streams, STREAMS), ("peer", self.peers, PEERS)):
            unknown = [x for x in given if x not in known]
            if unknown:
                raise KnnSsdError(f"unknown {name} {', '.join(unknown)}", fix=f"choose from {', '.join(known)}")
        if not self.streams:
            raise KnnSsdError("no stream to run", fix="use --streams task, mixed or task,mixed")
        if self.max_new_tokens < 1 or (self.prompts_per_domain is not None and self.prompts_per_domain < 1):
            raise KnnSsdError("max_new_tokens and prompts_per_domain must be >= 1", fix="e.g. 64 and 5")


@dataclass(frozen=True)
class Outcome:
    """One method on one prompt."""

    tokens: tuple[int, ...]
    seconds: float
    accepted: int = 0
    drafted: int = 0
    steps: int = 0
    routed_to: str = ""


@dataclass(frozen=True)
class PromptRun:
    """One row of the per-prompt table."""

    stream: str
    order: int
    domain: str
    method: str
    seconds: float
    plain_seconds: float
    new_tokens: int
    accepted: int
    drafted: int
    steps: int
    identical: bool
    routed_to: str


Runner = Callable[[torch.Tensor, str], Outcome]


def _ours(model: Any, drafter: Any, max_new_tokens: int) -> Runner:
    def run(ids: torch.Tensor, domain: str) -> Outcome:
        result = generate(model, ids, GenerationConfig(max_new_tokens=max_new_tokens), drafter)
        s = result.stats
        return Outcome(result.token_ids, s.total_seconds, s.accepted_tokens, s.drafted_tokens, s.verify_steps)
    return run


def _routed(runtime: Any, max_new_tokens: int) -> Runner:
    def run(ids: torch.Tensor, domain: str) -> Outcome:
        out = runtime.generate(ids, max_new_tokens=max_new_tokens)
        s = out.result.stats
        return Outcome(out.result.token_ids, s.total_seconds + out.routing_seconds, s.accepted_tokens,
                       s.drafted_tokens, s.verify_steps, "(fallback)" if out.route.fallback else out.route.domain)
    return run


def _oracle(model: Any, drafters: dict[str, Any], max_new_tokens: int) -> Runner:
    def run(ids: torch.Tensor, domain: str) -> Outcome:
        return _ours(model, drafters[domain], max_new_tokens)(ids, domain)
    return run


def _hf(model: Any, max_new_tokens: int, **assist: Any) -> Runner:
    clock = device_clock(next(model.parameters()).device)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id

    def run(ids: torch.Tensor, domain: str) -> Outcome:
        ids = ids.to(next(model.parameters()).device)
        start = clock()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, **assist)
        seconds = clock() - start
        return Outcome(tuple(out[0, ids.shape[1]:].tolist()), seconds)
    return run


def build_methods(runtime: Any, config: EvalConfig) -> dict[str, Runner]:
    """Every method of the study for `runtime` (a `BundleRuntime`), plain first."""
    model, layers = runtime.loaded.model, runtime.loaded.num_layers
    manifest = runtime.bundle.manifest
    domains = list(runtime.bundle.domains)
    drafters = {d: drafter_from_policy(runtime.bundle.policies[d], layers) for d in domains}
    fix = domains if config.fix_domains is None else list(config.fix_domains)
    unknown = [d for d in fix if d not in domains]
    if unknown:
        raise KnnSsdError(f"--fix-domains names {', '.join(unknown)}, not domains of the bundle",
                          fix=f"choose from {', '.join(domains)}")
    n = config.max_new_tokens
    methods: dict[str, Runner] = {"plain": _ours(model, None, n)}
    methods.update({f"fix-{d}": _ours(model, drafters[d], n) for d in fix})
    mix = manifest.get("reference_policies", {}).get("mix")
    if mix is not None:
        methods["mix"] = _ours(model, drafter_from_policy(mix["policy"], layers), n)
    methods["knn"] = _routed(runtime, n)
    methods["oracle"] = _oracle(model, drafters, n)
    methods.update({name: _ours(model, drafter_from_policy(policy, layers), n) for name, policy in config.policies})
    if config.peers:
        methods["hf-plain"] = _hf(model, n)
    if "hf-prompt-lookup" in config.peers:
        methods["hf-prompt-lookup"] = _hf(model, n, prompt_lookup_num_tokens=config.lookup_tokens)
    if "hf-early-exit" in config.peers:
        methods["hf-early-exit"] = _hf(model, n, assistant_early_exit=config.early_exit_layer or max(1, layers // 2))
    return methods


def stream_order(prompts: list[tuple[str, str]], stream: str, seed: int) -> list[tuple[str, str]]:
    """(domain, prompt) pairs in the stream's order: grouped by domain ("task") or shuffled ("mixed")."""
    if stream == "task":
        return sorted(prompts, key=lambda p: [d for d, _ in prompts].index(p[0]))
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def run_stream(stream: str, prompts: list[tuple[str, str]], encode: Callable[[str], torch.Tensor],
               methods: dict[str, Runner], seed: int, log: Callable[[str], None]) -> list[PromptRun]:
    """Run every method on every prompt of the stream, interleaved; plain's tokens judge the others."""
    rows: list[PromptRun] = []
    names = list(methods)
    ordered = stream_order(prompts, stream, seed)
    for i, (domain, text) in enumerate(ordered):
        ids = encode(text)
        rotation = names[i % len(names):] + names[:i % len(names)]
        outcomes = {name: methods[name](ids, domain) for name in rotation}
        plain = outcomes["plain"]
        for name in names:
            out = outcomes[name]
            rows.append(PromptRun(stream=stream, order=i, domain=domain, method=name, seconds=out.seconds,
                                  plain_seconds=plain.seconds, new_tokens=len(out.tokens), accepted=out.accepted,
                                  drafted=out.drafted, steps=out.steps, identical=out.tokens == plain.tokens,
                                  routed_to=out.routed_to))
        knn = outcomes.get("knn")
        log(f"[{stream} {i + 1}/{len(ordered)}] {domain}: " + ", ".join(
            f"{name} {plain.seconds / outcomes[name].seconds:.2f}x" for name in names if name != "plain")
            + (f"; routed to {knn.routed_to}" if knn is not None else ""))
    return rows


def summarise(rows: list[PromptRun]) -> list[dict[str, Any]]:
    """Per (stream, method, domain) and per (stream, method, overall): the figures of the module docstring."""
    groups: dict[tuple[str, str, str], list[PromptRun]] = {}
    for row in rows:
        for domain in (row.domain, OVERALL):
            groups.setdefault((row.stream, row.method, domain), []).append(row)
    table = []
    for (stream, method, domain), group in groups.items():
        steps = sum(r.steps for r in group)
        drafted = sum(r.drafted for r in group)
        accepted = sum(r.accepted for r in group)
        entry: dict[str, Any] = {
            "stream": stream, "method": method, "domain": domain, "prompts": len(group),
            "speedup": sum(r.plain_seconds for r in group) / sum(r.seconds for r in group),
            "mean_accepted": (accepted + steps) / steps if steps else float("nan"),
            "acceptance": accepted / drafted if drafted else float("nan"),
            "identical": sum(r.identical for r in group) / len(group),
            "routing_accuracy": (sum(r.routed_to == r.domain for r in group) / len(group)
                                 if method == "knn" else float("nan")),
        }
        table.append(entry)
    return table


def _compare(knn: float, other: float, tie: float) -> str:
    if abs(knn - other) <= tie * other:
        return f"ties with (within {tie:.0%})"
    return "beats" if knn > other else "does not beat"


def verdicts(table: list[dict[str, Any]], tie: float = 0.02) -> list[str]:
    """Plain statements: per stream and domain (overall last), does knn beat Self-SD(Fix) (each fixed policy,
    and their mean) and Self-SD(Mix)? Differences within `tie` (relative) are called ties: repeated runs of one
    method on this CPU differ by a few percent. Figures included, whatever the answer."""
    lines = []
    index = {(r["stream"], r["method"], r["domain"]): r["speedup"] for r in table}
    streams = list(dict.fromkeys(r["stream"] for r in table))
    for stream in streams:
        domains = [d for d in dict.fromkeys(r["domain"] for r in table if r["stream"] == stream) if d != OVERALL]
        fixes = sorted({r["method"] for r in table if r["method"].startswith("fix-")})
        for domain in domains + [OVERALL]:
            knn = index.get((stream, "knn", domain))
            if knn is None:
                continue
            parts = []
            if fixes:
                values = [index[(stream, f, domain)] for f in fixes]
                mean = sum(values) / len(values)
                beaten = sum(knn > v for v in values)
                parts.append(f"{_compare(knn, mean, tie)} Self-SD(Fix) on average "
                             f"({knn:.3f} vs mean {mean:.3f}; above {beaten} of {len(values)} fixed policies, "
                             f"best fixed {max(values):.3f})")
            if (stream, "mix", domain) in index:
                mix = index[(stream, "mix", domain)]
                parts.append(f"{_compare(knn, mix, tie)} Self-SD(Mix) ({knn:.3f} vs {mix:.3f})")
            lines.append(f"{stream} stream, {domain}: KNN-SSD " + "; ".join(parts) if parts else
                         f"{stream} stream, {domain}: KNN-SSD {knn:.3f} (no Fix or Mix to compare)")
    return lines


def read_rows(path: Any) -> list[PromptRun]:
    """The rows of a per_prompt.csv written by `write_outputs`."""
    rows = []
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            rows.append(PromptRun(
                stream=r["stream"], order=int(r["order"]), domain=r["domain"], method=r["method"],
                seconds=float(r["seconds"]), plain_seconds=float(r["plain_seconds"]), new_tokens=int(r["new_tokens"]),
                accepted=int(r["accepted"]), drafted=int(r["drafted"]), steps=int(r["steps"]),
                identical=r["identical"] == "True", routed_to=r["routed_to"]))
    return rows


def format_table(table: list[dict[str, Any]], stream: str) -> str:
    """A speedup matrix for one stream: methods as rows, domains (then overall) as columns."""
    rows = [r for r in table if r["stream"] == stream]
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != OVERALL)) + [OVERALL]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["domain"]): r for r in rows}
    width = max(10, max(len(d) for d in domains) + 1)
    lines = [f"{'method':<20}" + "".join(f"{d[:width - 1]:>{width}}" for d in domains)
             + f"{'mean acc':>10}{'identical':>10}"]
    for method in methods:
        overall = cell[(method, OVERALL)]
        lines.append(f"{method:<20}" + "".join(f"{cell[(method, d)]['speedup']:>{width}.3f}" for d in domains)
                     + f"{overall['mean_accepted']:>10.2f}{overall['identical']:>10.2f}")
    knn = cell.get(("knn", OVERALL))
    if knn is not None:
        lines.append(f"routing accuracy (knn): {knn['routing_accuracy']:.3f}")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], path: Any, title: str) -> None:
    """Figure-1-style grouped bars: speedup per domain for each method, one panel per stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(r["stream"] for r in table))
    fig, axes = plt.subplots(len(streams), 1, figsize=(13, 3.6 * len(streams)), squeeze=False)
    for ax, stream in zip(axes[:, 0], streams):
        rows = [r for r in table if r["stream"] == stream and r["method"] != "plain"]
        domains = [d for d in dict.fromkeys(r["domain"] for r in rows) if d != OVERALL] + [OVERALL]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cell = {(r["method"], r["domain"]): r["speedup"] for r in rows}
        width = 0.8 / len(methods)
        colours = plt.get_cmap("tab20")
        for m, method in enumerate(methods):
            xs = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(domains))]
            ax.bar(xs, [cell[(method, d)] for d in domains], width, label=method, color=colours(m % 20),
                   edgecolor="black" if method == "knn" else None)
        ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(domains)), domains, rotation=20)
        ax.set_ylabel("speedup over plain")
        ax.set_title(f"{title}: {stream} stream")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_prompts(table: Any, domains: list[str], per_domain: int | None) -> list[tuple[str, str]]:
    """(domain, prompt) of the held-out split, at most `per_domain` per domain, for the bundle's domains."""
    from pipeline.data import HELD_OUT, domains_of, prompts_of

    present = domains_of(table)
    missing = [d for d in domains if d not in present]
    if missing:
        raise KnnSsdError(f"the evaluation data has no prompts for the bundle's domains {', '.join(missing)}",
                          fix="pass the data the bundle was calibrated on (with the same --merge), or its format")
    chosen = []
    for domain in domains:
        texts = prompts_of(table, domain, HELD_OUT)[:per_domain]
        chosen.extend((domain, t) for t in texts)
    return chosen


def warm_up(runtime: Any, config: EvalConfig, ids: torch.Tensor, domain: str) -> None:
    """Every method once, 4 tokens, untimed: first calls pay one-off costs (allocations, lazy imports)."""
    for run in build_methods(runtime, replace(config, max_new_tokens=4)).values():
        run(ids, domain)


def evaluate(runtime: Any, prompts: list[tuple[str, str]], config: EvalConfig,
             log: Callable[[str], None] = print) -> list[PromptRun]:
    """The whole study on `prompts` ((domain, text) held out from calibration): every stream, every method."""
    methods = build_methods(runtime, config)
    log(f"evaluate: {len(prompts)} prompts x {len(methods)} methods ({', '.join(methods)}) x "
        f"{len(config.streams)} streams, {config.max_new_tokens} new tokens each")
    warm_up(runtime, config, runtime.encode(prompts[0][1]), prompts[0][0])
    rows: list[PromptRun] = []
    for stream in config.streams:
        rows.extend(run_stream(stream, prompts, runtime.encode, methods, config.seed, log))
    return rows


def metric_key(row: dict[str, Any], figure: str) -> str:
    """MLflow metric name, e.g. speedup/task/knn/coding."""
    return f"{figure}/{row['stream']}/{row['method']}/{row['domain']}"


def write_outputs(rows: list[PromptRun], table: list[dict[str, Any]], folder: Any, title: str,
                  tie: float = 0.02) -> list[str]:
    """per_prompt.csv, summary.csv, summary.json, speedup.png and report.txt in `folder`; returns the report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("per_prompt.csv", [asdict(r) for r in rows]), ("summary.csv", table)):
        with (folder / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    (folder / "summary.json").write_text(json.dumps(table, indent=2))
    plot(table, folder / "speedup.png", title)
    report = []
    for stream in dict.fromkeys(r["stream"] for r in table):
        report += [f"speedup over plain decoding, {stream} stream:", format_table(table, stream), ""]
    report += verdicts(table, tie)
    mismatched = sorted({(r.method, r.domain) for r in rows if not r.identical and not r.method.startswith("hf-")})
    report.append("lossless: every method of ours token-identical to plain decoding on every prompt" if not mismatched
                  else f"NOT LOSSLESS: {mismatched}")
    peers = sorted({(r.method, r.domain) for r in rows if not r.identical and r.method.startswith("hf-")})
    if peers:
        report.append(f"transformers' peers differ from plain greedy decoding on: {peers}")
    (folder / "report.txt").write_text("\n".join(report) + "\n")
    return report
