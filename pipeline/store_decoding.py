"""The store stage's decoding: each calibration prompt's plain greedy output by the engine's own loop, many prompts
per verify pass, and the loop's own successor rows after each output token.

`decode_store` keeps up to `batch_size` generations running (`knnssd.engine.decoding.Generation`, no drafter
but a `SuccessorRecorder`, which proposes nothing) and advances them together with `step`, which verifies every
request's row in one pass where the model allows (`knnssd.engine.batch.can_batch`) and one pass per request where
it does not (a sliding-window cache, e.g. Mistral's). A finished generation's place goes to the next prompt.

Exact: with the engine's batch-invariant kernels (`KernelPlan.batch_invariant`, fp32 on CPU) a request's row in a
packed pass computes the bits of its 1-token plain step, so each output is `generate(model, ids,
GenerationConfig(max_new_tokens=n))`'s token for token, and each successor row the one a `SuccessorRecorder`
records in that generation (`pipeline.traces.trace_prompt`). Without batch invariance (`batch_invariant` False:
a GPU, the library plan) every generation is stepped alone, which is plain decoding itself. Hence a store's
outputs are plain decoding's, and the search scores its trials on them (`pipeline.traces.store_traces`) without
decoding again.

A store needs a successor row after every output token, the last one included, which plain decoding never
computes (it stops there). So each generation runs with one token more than asked and without stopping at EOS
(`eos_token_ids=()`), and is stopped (its `on_tokens` hook) one step after it commits an EOS: the step that
verifies the EOS gives its row. Its output is then cut after its first EOS, at `max_new_tokens` at most, as
`generate` stops; the extra token is dropped. Cost: one step per prompt more than plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from knnssd.engine.decoding import Generation, GenerationConfig, TokenHook, begin, model_eos_ids, step
from knnssd.engine.drafters import SuccessorRecorder
from knnssd.errors import KnnSsdError

Rows = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class StoreDecoding:
    """outputs[i]: prompt i's new tokens (plain greedy decoding, cut after its first EOS, at most max_new_tokens);
    successors[i][j]: the loop's top successor ids after outputs[i][j], best first (one row per output token);
    batched: whether generations shared verify passes (False: each was stepped alone); embeddings: (prompts,
    hidden) float32, row i prompt i's embedding from its own prefill (final hidden state mean-pooled over the
    prompt), the one the runtime routes by, so calibration need not prefill the prompts again."""

    outputs: tuple[tuple[int, ...], ...]
    successors: tuple[Rows, ...]
    batched: bool
    embeddings: np.ndarray = field(compare=False, repr=False)


def check_settings(max_new_tokens: int, batch_size: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KnnSsdError(f"store outputs need max_new_tokens >= 1, got {max_new_tokens!r}",
                          fix="use e.g. --store-tokens 128")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KnnSsdError(f"the store batch size must be an integer >= 1, got {batch_size!r}",
                          fix="use e.g. --store-batch 8")


def stop_after_eos_row(eos: set[int]) -> TokenHook:
    """A hook that lets a generation run one step past its first EOS (the step that verifies the EOS, whose row
    is the EOS's successors), then stops it."""
    seen = False

    def hook(tokens: tuple[int, ...]) -> bool:
        nonlocal seen
        if seen:
            return False
        seen = any(token in eos for token in tokens)
        return True

    return hook


def finished(generation: Generation, recorder: SuccessorRecorder, eos: set[int],
             max_new_tokens: int) -> tuple[tuple[int, ...], Rows]:
    """A done generation's output (cut after its first EOS, at most `max_new_tokens`, and only as far as it has
    rows: a prompt near the model's context decodes what fits, and its last token, whose row would need one more
    position, is left out) and its rows."""
    tokens = generation.history[generation.state.prompt_length:]
    cut = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
    output = tuple(tokens[:min(cut, max_new_tokens, len(recorder.rows))])
    rows = tuple(tuple(row) for row in recorder.rows[:len(output)])
    if len(rows) != len(output):  # the loop verified every output token: cannot happen unless the loop changed
        raise RuntimeError(f"store decoding recorded {len(rows)} successor rows for {len(output)} output tokens")
    return output, rows


@torch.inference_mode()
def decode_store(model: PreTrainedModel, prompts: Sequence[torch.Tensor], max_new_tokens: int, batch_size: int,
                 batch_invariant: bool,
                 progress: Callable[[int, int], None] | None = None) -> StoreDecoding:
    """Plain greedy decoding of each prompt ((1, T_i) or (T_i,) token ids, already formatted:
    `knnssd.engine.prompts.encode_prompt`), up to `batch_size` at a time, with the loop's successor rows.
    `batch_invariant`: the model's kernels make a packed row compute a lone row's bits (the loaded model's
    `KernelPlan.batch_invariant`); when False each generation is stepped alone. `progress(done, total)` is called
    as prompts finish (at most about ten times)."""
    check_settings(max_new_tokens, batch_size)
    eos = set(model_eos_ids(model))
    context = getattr(model.config, "max_position_embeddings", None)

    def config_for(prompt_length: int) -> GenerationConfig:  # one more token than kept: the last token's row;
        budget = max_new_tokens + 1  # near the context, what fits (a prompt with no room is refused by `begin`)
        if context is not None and prompt_length + budget > context:
            budget = max(1, context - prompt_length)
        return GenerationConfig(max_new_tokens=budget, eos_token_ids=())
    queue = list(enumerate(prompts))
    running: list[tuple[int, Generation, SuccessorRecorder]] = []
    results: dict[int, tuple[tuple[int, ...], Rows]] = {}
    embeddings: dict[int, np.ndarray] = {}
    every = max(1, len(queue) // 10)
    while queue or running:
        while queue and len(running) < batch_size:
            index, prompt = queue.pop(0)
            recorder = SuccessorRecorder()
            ids = prompt.reshape(1, -1).to(torch.long)
            config = config_for(ids.shape[1])
            started = begin(model, ids, config)
            embeddings[index] = started.state.embedding.float().cpu().numpy()
            running.append((index, Generation(model, started.state, config, recorder, started.generator,
                                              started.clock, stop_after_eos_row(eos)), recorder))
        if batch_invariant:
            step(model, [generation for _, generation, _ in running])
        else:
            for _, generation, _ in running:
                step(model, [generation])
        for entry in [entry for entry in running if entry[1].done]:
            running.remove(entry)
            results[entry[0]] = finished(entry[1], entry[2], eos, max_new_tokens)
            if progress is not None and (len(results) % every == 0 or len(results) == len(prompts)):
                progress(len(results), len(prompts))
    order = range(len(prompts))
    return StoreDecoding(outputs=tuple(results[i][0] for i in order), successors=tuple(results[i][1] for i in order),
                         batched=batch_invariant and batch_size > 1,
                         embeddings=np.stack([embeddings[i] for i in order]).astype(np.float32)
                         if prompts else np.zeros((0, model.config.hidden_size), np.float32))
