"""A domain's warm successor rows: the model's top successors after every token of its store's outputs.

The store stage (`pipeline.tasks.build_store`) takes these rows from its decoding loop itself
(`pipeline.store_decoding`: each verify pass's committed row, as a `SuccessorRecorder` records it), so they are
the rows plain decoding computes. This module computes them for outputs that were not decoded by that loop
(outputs given as they are): one teacher-forced forward of the engine's model over each entry's prompt + output
gives the logits after every output token, and
`knnssd.engine.drafters.recycled.top_successors` their top MAX_SUCCESSORS ids: row j of an entry is the successors
of output token j. `pipeline.stores.DomainStore` keeps the rows per entry, so that its table (the updates
applied in store order, the last write of a token winning: `SuccessorTable.from_updates`, what
`Successors.update` does) can leave out a calibration prompt's own rows (`DomainStore.table(exclude=p)`), and
the bundle ships the whole table per domain (successors/<i>.npy).

The forward runs over the whole sequence at once, where the decoding loop's rows come one verify pass at a time,
so a near-tie among a row's successors may order differently than the loop's own row would. That is fine: the
table is draft knowledge only, verification keeps every output lossless, and replay stays exact because a trial
and the real loop start from the same table (what changes the table between them is the generation's own
updates, which replay reproduces from the trace).

Memory: the LM head runs over at most CHUNK positions at a time, so the logits held are CHUNK x vocab floats.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from knnssd.engine.decoding import project_logits
from knnssd.engine.drafters.recycled import top_successors
from knnssd.engine.kernels import transformers_kernels
from knnssd.engine.sublayers import model_lock

CHUNK = 256  # output positions per LM-head call


def model_vocab(model: torch.nn.Module) -> int:
    """The number of token ids the model scores (its LM head's rows): a successor table's row count."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


@torch.inference_mode()
def entry_successors(model: torch.nn.Module, prompt: torch.Tensor,
                     output: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The top successors after each token of `output` (new token ids) following `prompt` (1, T) or (T,): one
    forward over prompt + output; returns len(output) rows of min(MAX_SUCCESSORS, vocab) ids, best first."""
    if not output:
        return ()
    device = next(model.parameters()).device
    ids = torch.cat([prompt.reshape(-1).to(torch.long), torch.tensor(list(output), dtype=torch.long)]).to(device)
    start = ids.shape[0] - len(output)  # the position of output token 0
    positions = torch.arange(ids.shape[0], device=device).unsqueeze(0)
    with model_lock(model), transformers_kernels(model):
        hidden = model.model(input_ids=ids[None], position_ids=positions, use_cache=False).last_hidden_state[0]
    rows: list[tuple[int, ...]] = []
    for begin in range(start, ids.shape[0], CHUNK):
        logits = project_logits(model, hidden[begin:min(begin + CHUNK, ids.shape[0])])  # (chunk, vocab)
        rows.extend(tuple(row) for row in top_successors(logits))
    return tuple(rows)


def output_successors(model: torch.nn.Module, prompts: Sequence[torch.Tensor], outputs: Sequence[Sequence[int]],
                      progress: Callable[[int, int], None] | None = None) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """`entry_successors` of each (prompt, output) pair, in order; `progress(done, total)` after each."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    rows = []
    for prompt, output in zip(prompts, outputs):
        rows.append(entry_successors(model, prompt, output))
        if progress is not None:
            progress(len(rows), len(prompts))
    return tuple(rows)
