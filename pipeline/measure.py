"""Wall-clock measurement of several draft policies on the same prompts, against plain decoding.

Used where a decision or a claim rests on real time: confirming a search's top candidates, and the held-out
validation at the end of calibration. For each prompt, plain decoding runs first and last, and every policy
runs between them in a shuffled order, so that machine drift (another worker starting or finishing, thermal
changes) hits both sides of each ratio alike:

    plain seconds of a prompt = the mean of its two plain runs
    speedup of a policy       = sum over prompts of plain seconds / sum of the policy's seconds
    mismatch_rate             = share of prompts whose tokens differ from plain decoding's

The first plain run of each prompt is kept as its trace (`pipeline.replay.Trace`), so whoever also predicts
these policies' speedups on the same prompts (`pipeline.scoring`) needs no plain decoding of its own.

What is timed: every plain run (no drafter: the loop's plain path, nothing recorded in it) and every policy's
run. What is not: making the drafters, the warm-up, and, where the traces carry successors (by default where a
policy drafts recycled successors, whose replay reads them), one more plain generation per prompt with a
`SuccessorRecorder` (`pipeline.traces.with_successors`), run after all the timing, so its top-k per step never
enters plain decoding's seconds and it never runs between a prompt's timed runs.

A suffix-tree policy that drafts from a store gets, per prompt, the store without that prompt's own output
(`pipeline.drafting`): `stores` names each such policy's store and `texts` the prompts.

Greedy fp32 on CPU matches plain decoding except at a numerical near-tie, which a k-token verify can round
differently from a 1-token step (0 flips in 35,310 verified rows on SmolLM2, benchmarks/near_ties.py: rare, not
excluded); bf16 on CUDA rounds far coarser. A mismatch is recorded here rather than ending a calibration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from knnssd.engine.decoding import GenerationConfig, generate, warm_up
from knnssd.engine.stats import Tally
from pipeline.drafting import PolicyDrafters
from pipeline.replay import Trace, trace_of
from pipeline.traces import recycles, with_successors
from pipeline.stores import DomainStore


@dataclass(frozen=True)
class WallClock:
    """One policy's wall-clock figures on a set of prompts (see the module docstring)."""

    speedup: float
    mean_accepted_tokens: float
    acceptance_rate: float
    plain_seconds: float
    seconds: float
    mismatch_rate: float
    prompts: int
    threads: int

    def to_dict(self) -> dict[str, float]:
        return {"speedup": self.speedup, "mean_accepted_tokens": self.mean_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "plain_seconds": self.plain_seconds,
                "seconds": self.seconds, "mismatch_rate": self.mismatch_rate, "prompts": float(self.prompts),
                "threads": float(self.threads)}


@dataclass(frozen=True)
class Measured:
    """Each policy's wall-clock figures by name, each prompt's first plain run as its trace, and the seconds
    behind the figures prompt by prompt: plain (the mean of its two plain runs) and each policy's, for paired
    comparisons (`pipeline.confirm`)."""

    policies: dict[str, WallClock]
    traces: tuple[Trace, ...]
    plain_seconds: tuple[float, ...] = ()
    seconds: dict[str, tuple[float, ...]] = field(default_factory=dict)


def measure_policies(model: PreTrainedModel, policies: dict[str, dict[str, Any]], prompt_ids: list[torch.Tensor],
                     max_new_tokens: int, num_layers: int, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None,
                     stores: dict[str, DomainStore | None] | None = None, texts: list[str] | None = None,
                     drafters: PolicyDrafters | None = None, successors: bool | None = None) -> Measured:
    """Time every policy (name -> policy JSON) on every prompt (1, T), interleaved with plain decoding.
    `stores`: policy name -> the store it drafts from (if it does); `texts`: the prompts' texts; `successors`:
    whether the traces carry recorded successors (None: where some policy drafts recycled successors)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    stores, texts = stores or {}, texts or [None] * len(prompt_ids)
    make = drafters or PolicyDrafters(num_layers)
    per_prompt = [{name: make.drafter(policy, stores.get(name), text) for name, policy in policies.items()}
                  for text in texts]  # every drafter made (and refused) before any timing
    names = list(policies)
    if successors is None:
        successors = any(recycles(drafter) for made in per_prompt for drafter in made.values())
    rng = random.Random(seed)
    warm_up(model, prompt_ids[0])
    for drafter in per_prompt[0].values():
        if drafter is not None:
            warm_up(model, prompt_ids[0], drafter)
    plain_runs: list[float] = []
    runs: dict[str, list[float]] = {name: [] for name in names}
    tallies = {name: Tally() for name in names}
    mismatches = {name: 0 for name in names}
    traces = []
    for index, ids in enumerate(prompt_ids):
        first = generate(model, ids, config)
        traces.append(trace_of(ids, first, max_new_tokens))
        order = list(names)
        rng.shuffle(order)
        for name in order:
            result = generate(model, ids, config, per_prompt[index][name])
            runs[name].append(result.stats.total_seconds)
            tallies[name] += Tally.of(result.stats)
            mismatches[name] += result.token_ids != first.token_ids
        last = generate(model, ids, config)
        plain_runs.append((first.stats.total_seconds + last.stats.total_seconds) / 2)
        if progress is not None:
            progress(index + 1, len(prompt_ids))
    if successors:  # untimed, after every timed run
        traces = [with_successors(model, trace) for trace in traces]
    plain_total = sum(plain_runs)
    seconds = {name: sum(runs[name]) for name in names}
    timed = {name: WallClock(speedup=plain_total / seconds[name],
                             mean_accepted_tokens=tallies[name].mean_accepted_tokens,
                             acceptance_rate=tallies[name].acceptance_rate, plain_seconds=plain_total,
                             seconds=seconds[name], mismatch_rate=mismatches[name] / len(prompt_ids),
                             prompts=len(prompt_ids), threads=torch.get_num_threads())
             for name in names}
    return Measured(policies=timed, traces=tuple(traces), plain_seconds=tuple(plain_runs),
                    seconds={name: tuple(values) for name, values in runs.items()})
