"""The domain-shift study (the run; methods in `pipeline/methods.py`, figures in `pipeline/report.py`): does routing keep the speedup that a fixed draft policy loses across domains?

On held-out prompts of every domain, one run measures, interleaved prompt by prompt (each prompt runs every
method back to back, in an order rotated from prompt to prompt, so machine drift hits all methods alike):

    plain            the decoding loop with no drafter: the denominator of every speedup
    fix-<domain>     Self-SD(Fix): that domain's calibrated policy for every prompt (drafting from that
                     domain's store where the policy uses one)
    mix              Self-SD(Mix): one policy searched by the same pipeline on all domains' prompts together
                     (the bundle's reference policy "mix", drafting from the union of every domain's store;
                     absent if calibration ran with --no-mix)
    knn              KNN-SSD: the bundle routes each prompt from its own prefill embedding (routing time counted)
    oracle           each prompt gets its true domain's policy
    <name>           any extra policy given by name (`EvalConfig.policies`), for every prompt: e.g. each
                     drafter kind alone, or the single-path prompt lookup a token-tree bundle should beat
                     (the report gives KNN-SSD's verdict against each)
    hf-plain         transformers' own greedy `generate` (the peers' own baseline)
    hf-prompt-lookup transformers' assisted generation with prompt lookup (`prompt_lookup_num_tokens`)
    hf-early-exit    transformers' assisted generation with its early-exit assistant (`assistant_early_exit`)

Two streams: "task" (prompts grouped by domain, domain after domain) and "mixed" (the same prompts shuffled);
and with `ood_domains`, a third, "ood": prompts of domains the bundle was not calibrated on (every method but
the oracle, which has no true policy for them), to show what routing does out of distribution: how often it
falls back, where it routes, and what speedup that gives.
Figures per stream, method and domain (and "overall", pooled over every prompt of the stream):

    speedup       = sum of plain seconds / sum of the method's seconds, over the same prompts
    decode_speedup = the same with each run's prefill taken out of its seconds (our methods: every one prefills
                    the prompt with the same computation; routing stays in KNN-SSD's seconds): the decoding
                    phase's speedup, which a longer generation approaches; prefill_share = plain decoding's
                    prefill seconds / its seconds
    mean_accepted = (accepted + verify steps) / verify steps, pooled (our methods only)
    acceptance    = accepted / drafted, pooled (our methods only)
    mean_verify_width = (drafted + verify steps) / verify steps, pooled: the tokens a verify pass ran on, a
                    token tree's nodes plus the last committed token (1.0 for plain; our methods only)
    identical     = fraction of prompts whose tokens equal plain decoding's
    routing_accuracy (knn) = fraction routed to the prompt's true domain (a fallback counts as a miss)
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from knnssd.errors import KnnSsdError
from pipeline.evalconfig import OOD_STREAM, EvalConfig
from pipeline.report import PromptRun

if TYPE_CHECKING:
    import torch

    from pipeline.methods import Runner


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
                                  routed_to=out.routed_to, tree_steps=out.tree_steps,
                                  no_draft_steps=out.no_draft_steps, prefill_seconds=out.prefill_seconds,
                                  plain_prefill_seconds=plain.prefill_seconds))
        knn = outcomes.get("knn")
        log(f"[{stream} {i + 1}/{len(ordered)}] {domain}: " + ", ".join(
            f"{name} {plain.seconds / outcomes[name].seconds:.2f}x" for name in names if name != "plain")
            + (f"; routed to {knn.routed_to}" if knn is not None else ""))
    return rows


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


def warm_up_methods(runtime: Any, config: EvalConfig, ids: torch.Tensor, domain: str) -> None:
    """Every method once, 4 tokens, untimed: first calls pay one-off costs (allocations, lazy imports)."""
    from pipeline.methods import build_methods

    for run in build_methods(runtime, replace(config, max_new_tokens=4)).values():
        run(ids, domain)


def ood_prompts(table: Any, bundle_domains: list[str], ood_domains: tuple[str, ...],
                per_domain: int | None) -> list[tuple[str, str]]:
    """(domain, prompt) of each of `ood_domains` (any split: the bundle never saw them), at most `per_domain`."""
    from pipeline.data import domains_of

    present = domains_of(table)
    calibrated = [d for d in ood_domains if d in bundle_domains]
    missing = [d for d in ood_domains if d not in present]
    if calibrated or missing:
        raise KnnSsdError(f"--ood-domains must be domains of the data the bundle was not calibrated on; "
                          f"{', '.join(calibrated + missing)} " + ("are calibrated" if calibrated else "are not in the data"),
                          fix=f"choose from {', '.join(d for d in present if d not in bundle_domains) or '(none left)'}")
    prompts_by_domain = {d: [p for dom, p in zip(table["domain"].to_pylist(), table["prompt"].to_pylist()) if dom == d]
                         for d in ood_domains}
    return [(d, text) for d in ood_domains for text in prompts_by_domain[d][:per_domain]]


def evaluate(runtime: Any, prompts: list[tuple[str, str]], config: EvalConfig,
             log: Callable[[str], None] = print, unseen: list[tuple[str, str]] = ()) -> list[PromptRun]:
    """The whole study on `prompts` ((domain, text) held out from calibration): every stream, every method;
    then the "ood" stream on `unseen` prompts (domains the bundle does not have), without the oracle."""
    from pipeline.methods import build_methods

    methods = build_methods(runtime, config)
    log(f"evaluate: {len(prompts)} prompts x {len(methods)} methods ({', '.join(methods)}) x "
        f"{len(config.streams)} streams, {config.max_new_tokens} new tokens each"
        + (f"; then {len(unseen)} out-of-distribution prompts" if unseen else ""))
    warm_up_methods(runtime, config, runtime.encode(prompts[0][1]), prompts[0][0])
    rows: list[PromptRun] = []
    for stream in config.streams:
        rows.extend(run_stream(stream, prompts, runtime.encode, methods, config.seed, log))
    if unseen:
        known = {name: run for name, run in methods.items() if name != "oracle"}
        rows.extend(run_stream(OOD_STREAM, list(unseen), runtime.encode, known, config.seed, log))
    return rows
