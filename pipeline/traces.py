"""Plain greedy decoding recorded for replay (`pipeline.replay`): a prompt's `Trace`.

A trace holds what replay needs to reproduce a drafter's events without the model: the prompt, plain decoding's
new tokens, and, where recorded, the target's top successors after each new token
(`knnssd.engine.drafters.recycled.top_successors`), which a suffix tree with recycled successors updates its
table from exactly as the real loop does (the loop hands it the same rows' logits, computed with the same bits:
the engine's verify rows are batch invariant).

What is timed and what is not: a trace's `seconds` and `prefill_seconds` are those of a plain generation with no
drafter at all, the loop's plain path. The successors come from a second, untimed generation of the same prompt
with a `SuccessorRecorder` (which adds a draft request and a top-k per step: small, but not plain decoding's
cost), whose tokens must equal the timed run's (`with_successors`). `trace_prompt` does both; a wall-clock
measurement (`pipeline.measure`) keeps its own timed plain run as the trace and records the successors after
all its timing.

Traces from a store (`store_traces`): the store stage decodes every calibration prompt plainly with the engine's
own loop and records the loop's successor rows (`pipeline.store_decoding`), so a store output's first
`max_new_tokens` tokens are plain decoding's trace of that prompt, and its rows the trace's successors, with no
decoding in the search. Such a trace is not timed: `timed` is False and its `seconds` and `prefill_seconds` are
0.0. Nothing that scores reads them: a trial's price comes from the step-cost table (`pipeline.scoring`), and
the wall-clock stages (`pipeline.measure`, `pipeline.confirm`) time their own runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from transformers import PreTrainedModel

from knnssd.engine.decoding import GenerationConfig, GenerationResult, generate, model_eos_ids
from knnssd.engine.drafters import Drafter, SuccessorRecorder, SuffixTreeDrafter
from knnssd.errors import KnnSsdError


@dataclass(frozen=True)
class Trace:
    """One prompt's plain greedy decoding, what every replay on it is scored against.

    prompt: the prompt's token ids; tokens: the new tokens (the prefill's first); max_new_tokens: the budget it
    ran with; prefill_seconds / seconds: wall clock of its prefill and of the whole plain generation (0.0 when
    not `timed`); successors: None (not recorded), or successors[j] the target's top successor ids after new
    token j, best first (one per new token but the last); timed: False for a trace taken from a store, whose
    seconds were never measured.
    """

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    max_new_tokens: int
    prefill_seconds: float
    seconds: float
    successors: tuple[tuple[int, ...], ...] | None = None
    timed: bool = True


def trace_of(prompt_ids: torch.Tensor, result: GenerationResult, max_new_tokens: int,
             successors: list[list[int]] | None = None) -> Trace:
    """The trace of a finished plain greedy generation of `prompt_ids` (1, T); `successors`: its recorded rows
    (`SuccessorRecorder.rows`), if any."""
    return Trace(prompt=tuple(prompt_ids[0].tolist()), tokens=result.token_ids, max_new_tokens=max_new_tokens,
                 prefill_seconds=result.stats.prefill_seconds, seconds=result.stats.total_seconds,
                 successors=None if successors is None else tuple(tuple(row) for row in successors))


def with_successors(model: PreTrainedModel, trace: Trace) -> Trace:
    """`trace` with its successors recorded by an untimed plain generation of its prompt (a `SuccessorRecorder`
    as the drafter: the loop computes exactly plain decoding). Its tokens must be the trace's: greedy decoding of
    one prompt twice on one model gives one output, else replay would score a text the model does not produce."""
    prompt_ids = torch.tensor([list(trace.prompt)], device=model.device)
    recorder = SuccessorRecorder()
    recorded = generate(model, prompt_ids, GenerationConfig(max_new_tokens=trace.max_new_tokens), recorder)
    if recorded.token_ids != trace.tokens:
        differ = next((i for i, (a, b) in enumerate(zip(recorded.token_ids, trace.tokens)) if a != b),
                      min(len(recorded.token_ids), len(trace.tokens)))
        raise KnnSsdError(f"plain greedy decoding of one prompt gave two outputs (they differ at new token "
                          f"{differ}): the model's kernels are not deterministic here, and replay would score "
                          "recycled successors of another text",
                          fix="calibrate with deterministic kernels (e.g. fp32 on CPU), or search without recycled "
                              "successors")
    return replace(trace, successors=tuple(tuple(row) for row in recorder.rows))


def trace_prompt(model: PreTrainedModel, prompt_ids: torch.Tensor, max_new_tokens: int) -> Trace:
    """Plain greedy decoding of `prompt_ids` (1, T), timed with no drafter, and its successors recorded by an
    untimed second generation (`with_successors`)."""
    result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens))
    return with_successors(model, trace_of(prompt_ids, result, max_new_tokens))


def recycles(drafter: Drafter | None) -> bool:
    """Whether a replay of `drafter` reads the trace's successors (a suffix tree with recycled successors)."""
    return isinstance(drafter, SuffixTreeDrafter) and drafter.config.recycled_nodes > 0


def store_trace(prompt_ids: torch.Tensor, output: Sequence[int], rows: Sequence[Sequence[int]] | None,
                max_new_tokens: int, eos: Sequence[int]) -> Trace | None:
    """The trace of plain greedy decoding of `prompt_ids` (1, T) with `max_new_tokens`, from its store entry:
    `output`, plain decoding's output with the store's budget (`pipeline.store_decoding`), and `rows`, its
    successor rows (one per output token; None: none kept). None when the output cannot tell: shorter than
    `max_new_tokens` without ending in one of the `eos` ids (the store's budget was smaller). Untimed."""
    if len(output) < max_new_tokens and (not output or output[-1] not in set(eos)):
        return None
    tokens = tuple(output[:max_new_tokens])
    if rows is not None and len(rows) < len(tokens) - 1:
        raise KnnSsdError(f"a store entry has {len(rows)} successor rows for {len(output)} output tokens",
                          fix="rebuild the store: it needs one successor row per output token")
    return Trace(prompt=tuple(prompt_ids.reshape(-1).tolist()), tokens=tokens, max_new_tokens=max_new_tokens,
                 prefill_seconds=0.0, seconds=0.0, timed=False,
                 successors=None if rows is None else tuple(tuple(row) for row in rows[:len(tokens) - 1]))


def store_traces(model: PreTrainedModel, prompt_ids: Sequence[torch.Tensor], outputs: Sequence[Sequence[int]],
                 successors: Sequence[Sequence[Sequence[int]]] | None,
                 max_new_tokens: int) -> list[Trace | None]:
    """`store_trace` of each prompt (1, T_i) with its store output and rows (`successors[i]`; None: the store
    kept none); a trace whose rows the store lacks gets them from an untimed plain generation
    (`with_successors`, which also checks that it decodes the store's tokens)."""
    eos = model_eos_ids(model)
    traces = []
    for index, (ids, output) in enumerate(zip(prompt_ids, outputs)):
        trace = store_trace(ids, output, None if successors is None else successors[index], max_new_tokens, eos)
        traces.append(with_successors(model, trace) if trace is not None and trace.successors is None else trace)
    return traces
