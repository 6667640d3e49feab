"""Plain greedy decoding recorded for replay (`pipeline.replay`): a prompt's `Trace`.

A trace holds what replay needs to reproduce a drafter's events without the model: the prompt, plain decoding's
new tokens, and, where recorded (`trace_prompt` records them), the target's top successors after each new token
(`knnssd.engine.drafters.recycled.top_successors`), which a suffix tree with recycled successors updates its
table from exactly as the real loop does (the loop hands it the same rows' logits, computed with the same bits:
the engine's verify rows are batch invariant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from knnssd.engine.decoding import GenerationConfig, GenerationResult, generate
from knnssd.engine.drafters import SuccessorRecorder


@dataclass(frozen=True)
class Trace:
    """One prompt's plain greedy decoding, what every replay on it is scored against.

    prompt: the prompt's token ids; tokens: the new tokens (the prefill's first); max_new_tokens: the budget it
    ran with; prefill_seconds / seconds: wall clock of its prefill and of the whole plain generation;
    successors: None (not recorded), or successors[j] the target's top successor ids after new token j, best
    first (one per new token but the last).
    """

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    max_new_tokens: int
    prefill_seconds: float
    seconds: float
    successors: tuple[tuple[int, ...], ...] | None = None


def trace_of(prompt_ids: torch.Tensor, result: GenerationResult, max_new_tokens: int,
             successors: list[list[int]] | None = None) -> Trace:
    """The trace of a finished plain greedy generation of `prompt_ids` (1, T); `successors`: its recorded rows
    (`SuccessorRecorder.rows`), if any."""
    return Trace(prompt=tuple(prompt_ids[0].tolist()), tokens=result.token_ids, max_new_tokens=max_new_tokens,
                 prefill_seconds=result.stats.prefill_seconds, seconds=result.stats.total_seconds,
                 successors=None if successors is None else tuple(tuple(row) for row in successors))


def trace_prompt(model: PreTrainedModel, prompt_ids: torch.Tensor, max_new_tokens: int) -> Trace:
    """Plain greedy decoding of `prompt_ids` (1, T), timed, with its successors recorded (a top-k of each step's
    logits, within the timed run: microseconds against a forward pass)."""
    recorder = SuccessorRecorder()
    result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens), recorder)
    return trace_of(prompt_ids, result, max_new_tokens, recorder.rows)
