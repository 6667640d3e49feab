"""A trial's score: its replayed events (`pipeline.replay`) priced by the worker's step costs (`pipeline.costs`).

    predicted speedup = sum over prompts of predicted plain seconds / sum of predicted drafted seconds

Deterministic: the same policy on the same prompts with the same table scores the same, to the last digit,
whichever worker traced the prompts: nothing in the price is measured during the trial or the trace (the
prefill too is priced from the table). A node's workers share one table; a worker on another node prices with
its own, so scores from different nodes are comparable only as far as their tables agree
(`pipeline.confirm.top_candidates` therefore dedupes by policy as well as by score).

A suffix-tree policy that drafts from its domain's store (or, by its store_scope, from the union of every domain's)
replays each prompt drafting from that store without that prompt's own output (`pipeline.drafting`), so a
workload knows its prompts' texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.policy import layer_skip_parts
from knnssd.engine.skipset import SkipSet
from knnssd.engine.stats import Tally
from knnssd.errors import KnnSsdError
from pipeline.costs import StepCosts
from pipeline.drafting import PolicyDrafters
from pipeline.replay import Prediction, Trace, full_cache, predict_all, replay, trace_prompt
from pipeline.stores import DomainStore


class Predictions:
    """A workload's layer-skip predictions (`pipeline.replay.predict`), each computed once per (prompt, skip set)
    and kept, and each prompt's layer inputs with nothing skipped (`predict`'s `inputs`), so a pass starts at the
    first layer its skip set touches. A search's trials share them: layer-skip and hybrid trials of one skip
    set replay one prediction per prompt, and every pass skips the layers before its first skipped one.

    A prediction is a pure function of the model, the trace, its cache and the skip set, and `predict` computes
    the same bits from a captured layer input, so a score is the same as with a fresh pass per trial. For one
    model: the workload's caches are that model's (a second model is refused). Memory: two tuples of `queries`
    numbers per (prompt, skip set), and at most 4 x layers x queries x hidden bytes of layer inputs per prompt."""

    def __init__(self) -> None:
        self.model: PreTrainedModel | None = None
        self.kept: dict[tuple[int, SkipSet], Prediction] = {}
        self.inputs: dict[int, list[torch.Tensor]] = {}

    def prepare(self, model: PreTrainedModel, workload: "Workload", skip_set: SkipSet) -> None:
        """Compute the predictions of `skip_set` on every prompt of `workload` not kept yet, in one
        `predict_all` (the model set up for the skip set once)."""
        if self.model is None:
            self.model = model
        elif self.model is not model:
            raise KnnSsdError("a workload's layer-skip predictions were asked of a second model",
                              fix="score a workload with the model that built it (workload_of)")
        missing = [i for i in range(len(workload.traces)) if (i, skip_set) not in self.kept]
        if missing:
            made = predict_all(model, [(workload.traces[i], workload.caches[i], self.inputs.setdefault(i, []))
                                       for i in missing], skip_set)
            self.kept.update({(i, skip_set): prediction for i, prediction in zip(missing, made)})

    def get(self, model: PreTrainedModel, workload: "Workload", index: int, skip_set: SkipSet) -> Prediction:
        """`predict(model, trace, cache, skip_set)` for the prompt `index` of `workload` (`prepare` first)."""
        self.prepare(model, workload, skip_set)
        return self.kept[index, skip_set]


@dataclass(frozen=True)
class Workload:
    """The prompts a search scores on: each one's plain greedy trace and the full model's cache over it, and its
    text (None: unknown; a store-drafting policy then drafts from the whole store); `predictions`: its layer-skip
    predictions, kept across the policies scored on it (`Predictions`)."""

    traces: tuple[Trace, ...]
    caches: tuple[DynamicCache, ...]
    texts: tuple[str | None, ...] = ()
    predictions: Predictions = field(default_factory=Predictions, init=False, compare=False, repr=False)

    def text(self, index: int) -> str | None:
        return self.texts[index] if index < len(self.texts) else None


@dataclass(frozen=True)
class Score:
    """A policy's predicted figures on a workload (mean accepted and acceptance pooled by `Tally`)."""

    predicted_speedup: float
    mean_accepted_tokens: float
    acceptance_rate: float
    plain_seconds: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return {"predicted_speedup": self.predicted_speedup, "mean_accepted_tokens": self.mean_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "predicted_plain_seconds": self.plain_seconds,
                "predicted_seconds": self.seconds}


def build_workload(model: PreTrainedModel, prompt_ids: list[torch.Tensor], max_new_tokens: int,
                   texts: Sequence[str] = ()) -> Workload:
    """Plain decoding of each prompt (1, T) of text texts[i], and its cache for layer-skip replays."""
    return workload_of(model, [trace_prompt(model, ids, max_new_tokens) for ids in prompt_ids], texts)


def workload_of(model: PreTrainedModel, traces: Sequence[Trace], texts: Sequence[str] = ()) -> Workload:
    """The workload of prompts (of texts `texts`) already decoded plainly: each trace's cache for layer-skip
    replays."""
    return Workload(traces=tuple(traces), caches=tuple(full_cache(model, trace) for trace in traces),
                    texts=tuple(texts))


def policy_skip_set(policy: dict[str, Any]) -> SkipSet | None:
    """The skip set of a policy's layer-skip part, None when it has none."""
    kind = policy.get("kind")
    if kind == "layer_skip":
        return layer_skip_parts(policy)[0]
    if kind == "hybrid":
        return layer_skip_parts(policy["layer_skip"])[0]
    return None


def score_policy(model: PreTrainedModel, policy: dict[str, Any], num_layers: int, workload: Workload,
                 costs: StepCosts, store: DomainStore | None = None,
                 drafters: PolicyDrafters | None = None) -> Score:
    """Replay `policy` on every prompt of `workload` and price it. `store`: the policy's domain store, for a
    suffix tree that drafts from it; `drafters`: the worker's (keeps indexed stores across trials)."""
    drafters = drafters or PolicyDrafters(num_layers)
    skip_set = policy_skip_set(policy)
    plain = seconds = 0.0
    tally = Tally()
    for index, (trace, cache) in enumerate(zip(workload.traces, workload.caches)):
        drafter = drafters.drafter(policy, store, workload.text(index))
        plain += costs.plain_seconds(trace)
        if drafter is None:
            seconds += costs.plain_seconds(trace)
            tally += Tally(steps=len(trace.tokens) - 1)
            continue
        prediction = workload.predictions.get(model, workload, index, skip_set) if skip_set is not None else None
        replayed = replay(drafter, trace, prediction)
        seconds += costs.generation_seconds(trace, replayed, skip_set)
        tally += replayed.tally
    speedup = plain / seconds if seconds else 1.0  # nothing priced on either side (a table without prefill)
    return Score(predicted_speedup=speedup, mean_accepted_tokens=tally.mean_accepted_tokens,
                 acceptance_rate=tally.acceptance_rate, plain_seconds=plain, seconds=seconds)
