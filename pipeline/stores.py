"""Per-domain stores of the model's own outputs: draft knowledge for suffix-tree policies.

A domain's store is the model's greedy continuation of each of the domain's calibration prompts. A suffix-tree
policy with `use_store` drafts from it as well as from the text (`knnssd.engine.drafters.suffix_tree`). A trial that
measures calibration prompt p drafts from the store without p's own output (`DomainStore.arrays(exclude=p)`),
else it would look its own future up; held-out prompts and the bundle use the whole store.

A store may also carry the model's top successors after every output token (`successors`, the store stage's
decoding loop's own rows): the domain's warm successor table
(`DomainStore.table`) that a suffix-tree policy with `use_warm` starts from, built as the real loop's updates
would (`SuccessorTable.from_updates`, in store order, the last write of a token winning). A trial on calibration
prompt p starts from the table without p's rows (`table(exclude=p)`), for the same reason as the text.

A domain's store may also carry the union of every domain's store (`union_store`, set by
`pipeline.store_stage.build_stores` once all are built): what a suffix-tree policy with store_scope "union" or
"both" drafts from, leave-one-out the same way (`union_store.arrays(exclude=p)`). It is not part of the store's
equality (two domains' stores stay unequal by their own data), only of its study's fingerprint
(`pipeline.search.store_fingerprint`) where it differs from the store itself (`has_union`).

The store stage decodes with the engine's own loop (`pipeline.store_decoding`, called by
`pipeline.tasks.build_store`), so outputs are plain decoding's exactly and double as the search's traces.
`build_outputs` (transformers' batched `generate`, greedy, left padding) is kept for outputs that need not be
plain decoding's (benchmarks, tests); the bundle keeps stores as stores/<i>.npy (`knnssd.bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from knnssd.bundle import join_store
from knnssd.engine.decoding import model_eos_ids
from knnssd.engine.drafters import SuccessorTable
from knnssd.engine.kernels import transformers_kernels
from pipeline.store_decoding import check_settings


def build_outputs(model: torch.nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                  batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[tuple[int, ...]]:
    """The model's greedy continuation of each prompt, `batch_size` prompts per `generate` call.

    prompts: token ids, each (1, T_i) or (T_i,), already formatted (`knnssd.engine.prompts.encode_prompt`). Returns one
    tuple of new token ids per prompt, in order, at most `max_new_tokens` long and cut after its first EOS (kept,
    as `knnssd.engine.decoding.generate` keeps it). `progress(done, total)` is called after each batch.

    Batches are left-padded with an attention mask, so a batched continuation may differ from the unbatched
    greedy one where two next tokens are near-tied (padding changes the float sums slightly). That is fine for a
    store: it is draft knowledge only, and verification keeps every output lossless whatever is drafted.
    """
    check_settings(max_new_tokens, batch_size)
    eos = model_eos_ids(model)
    pad = next((p for p in (getattr(model.generation_config, "pad_token_id", None), model.config.pad_token_id,
                            *eos) if p is not None), 0)
    device = next(model.parameters()).device
    rows = [prompt.reshape(-1).to(torch.long) for prompt in prompts]
    outputs: list[tuple[int, ...]] = []
    with transformers_kernels(model), torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(row) for row in batch)
            ids = torch.full((len(batch), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):  # left padding: every row's last token is at the same position
                ids[i, width - len(row):] = row
                mask[i, width - len(row):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                 pad_token_id=int(pad), eos_token_id=list(eos) or None)
            for new in out[:, width:].tolist():
                cut = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
                outputs.append(tuple(new[:cut]))
            if progress is not None:
                progress(len(outputs), len(rows))
    return outputs


@dataclass(frozen=True)
class DomainStore:
    """domain: its name; prompts: the calibration prompt texts, in order; outputs: the model's greedy
    continuation (new token ids) of each, in the same order; successors: None (not computed), or successors[i][j]
    the model's top successor ids after outputs[i][j], best first (one row per output token, or no rows at all
    for an entry the model did not decode: a `--corpus` text, which then updates no table row); vocab: the
    model's vocabulary size (the table's rows), given with successors; union_store: None, or the union of every
    domain's store (this one's among them), for store_scope "union"/"both" policies (not compared, not shown);
    embeddings: None, or (n, hidden) float32, the runtime's embedding of prompts[i] for i < n (the store stage's
    own prefills, `pipeline.store_decoding`), which calibration's embedding stage takes instead of prefilling
    those prompts again (not compared, not shown, not shipped)."""

    domain: str
    prompts: tuple[str, ...]
    outputs: tuple[tuple[int, ...], ...]
    successors: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    vocab: int = 0
    union_store: "DomainStore | None" = field(default=None, compare=False, repr=False)
    embeddings: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.outputs):
            raise ValueError(f"store {self.domain}: {len(self.prompts)} prompts but {len(self.outputs)} outputs")
        if self.successors is not None:
            if len(self.successors) != len(self.outputs) or any(
                    rows and len(rows) != len(output) for rows, output in zip(self.successors, self.outputs)):
                raise ValueError(f"store {self.domain}: successors need one row per output token (or none)")
            if self.vocab < 1:
                raise ValueError(f"store {self.domain}: successors need the vocabulary size")
        if self.embeddings is not None and (self.embeddings.ndim != 2 or len(self.embeddings) > len(self.prompts)):
            raise ValueError(f"store {self.domain}: embeddings must be (n, hidden) with n <= {len(self.prompts)} "
                             f"prompts, got {self.embeddings.shape}")

    def prompt_embeddings(self) -> dict[str, np.ndarray]:
        """{prompt text: its embedding (hidden,)} for the prompts the store stage prefilled (none without)."""
        if self.embeddings is None:
            return {}
        return dict(zip(self.prompts, self.embeddings))

    def table(self, exclude: str | None = None) -> SuccessorTable | None:
        """The warm successor table (vocab, k) of every entry's rows but those of prompt text `exclude` (if it is
        one), applied in store order; None without successors."""
        if self.successors is None:
            return None
        kept = [(output, rows) for prompt, output, rows in zip(self.prompts, self.outputs, self.successors)
                if prompt != exclude and rows]
        return SuccessorTable.from_updates(self.vocab, [t for output, _ in kept for t in output],
                                           [row for _, rows in kept for row in rows])

    def arrays(self, exclude: str | None = None) -> list[tuple[int, ...]]:
        """The token arrays to draft from, without the outputs of prompt text `exclude` (if it is one)."""
        return [output for prompt, output in zip(self.prompts, self.outputs) if prompt != exclude]

    @property
    def has_union(self) -> bool:
        """Whether it carries a union that holds more than its own data (only then is store_scope searched)."""
        return self.union_store is not None and (self.union_store.prompts, self.union_store.outputs) != (
            self.prompts, self.outputs)

    @property
    def tokens(self) -> int:
        return sum(len(output) for output in self.outputs)

    def joined(self) -> np.ndarray:
        """(tokens + arrays,) int32: every output followed by -1, as the bundle stores it (`join_store`)."""
        return join_store(self.outputs)

    @classmethod
    def union(cls, stores: Iterable["DomainStore"], domain: str) -> "DomainStore":
        """One store of every store's outputs (the Self-SD(Mix) reference drafts from it), in the order given,
        carrying no union of its own."""
        stores = list(stores)
        warm = bool(stores) and all(s.successors is not None for s in stores)
        return cls(domain=domain, prompts=tuple(p for s in stores for p in s.prompts),
                   outputs=tuple(o for s in stores for o in s.outputs),
                   successors=tuple(r for s in stores for r in s.successors) if warm else None,
                   vocab=max(s.vocab for s in stores) if warm else 0)
