"""Recycled successors, in the manner of Token Recycling (Luo et al. 2024): the model's own top-k next tokens of
each token id, kept from earlier verify passes, so a draft exists even where the text has no match.

- `top_successors(logits)`: the top `MAX_SUCCESSORS` token ids of each row of logits (n, vocab), best first. The
  one function every table update goes through, in the real loop and in replay alike.
- `SuccessorTable`: a read-only warm start, (vocab, k) int32, -1 where a token has no entry yet: a domain's
  table, built at calibration's store stage from the model's successors over the store's outputs
  (`SuccessorTable.from_updates`, `pipeline.successors`) and shipped in the bundle (successors/<i>.npy), which
  a suffix-tree policy with `use_warm` starts each generation from. `SuccessorTable.merged` joins domains'
  tables (the mix reference's and the fallback's).
- `Successors`: one generation's table, the warm start under this generation's own updates (a dict overlay, so
  starting a generation copies nothing). A session keeps its own: generations never share mutable state, so the
  server's threads need no lock, and each generation's drafts depend on its prompt alone (what makes replay
  exact). What one generation learns is not carried to the next; a warm start carries a domain's.
- `SuccessorRecorder`: a drafter that proposes nothing and records each committed row's top successors: plain
  decoding with a recording, what `pipeline.replay.trace_prompt` keeps so that replay can update the table
  exactly as the real loop does.

Which rows update the table: only the rows of a verify pass whose input is a committed token (the last committed
token and the accepted drafts). Their logits are the ones plain decoding computes at those positions (the
engine's kernels are batch invariant), so replay, which has plain decoding's output and not the rejected drafts'
logits, reproduces every update. Rows after a rejected draft token are dropped: their logits condition on text
that was never committed and exist only in the real loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from knnssd.engine.drafters.base import Draft, DraftRequest
from knnssd.errors import KnnSsdError

MAX_SUCCESSORS = 8  # successors kept per token (Token Recycling's k); recycled_k may keep fewer of them
RANK_PRIOR = tuple(0.5 ** (rank + 1) for rank in range(MAX_SUCCESSORS))  # a rank-r successor's path factor


def top_successors(logits: torch.Tensor) -> list[list[int]]:
    """The top min(MAX_SUCCESSORS, vocab) token ids of each row of `logits` (n, vocab), best first."""
    return logits.topk(min(MAX_SUCCESSORS, logits.shape[-1]), dim=-1).indices.tolist()


@dataclass(frozen=True, eq=False)
class SuccessorTable:
    """A warm-start table: `table` (vocab, k) int32, row t the successors of token t best first, -1 where it has
    none. Read-only; build it with `SuccessorTable.of(array)`."""

    table: np.ndarray

    @classmethod
    def of(cls, array: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> "SuccessorTable":
        values = np.asarray(array.cpu() if isinstance(array, torch.Tensor) else array)
        if values.ndim != 2 or not 1 <= values.shape[1] <= MAX_SUCCESSORS or values.dtype.kind not in "iu":
            raise KnnSsdError(f"a successor table must be (vocab, k) integers with 1 <= k <= {MAX_SUCCESSORS}, "
                              f"got shape {values.shape} of {values.dtype}",
                              fix="give each token id's top-k successor ids as one row, -1 where unknown")
        if values.size and (values.min() < -1 or values.max() >= max(values.shape[0], 1)):
            raise KnnSsdError(f"a successor table holds ids outside -1..{values.shape[0] - 1} (its vocabulary)",
                              fix="use -1 for an empty entry and token ids below the table's row count")
        table = values.astype(np.int32, copy=True)
        table.setflags(write=False)
        return cls(table)

    @classmethod
    def from_updates(cls, vocab: int, tokens: Sequence[int], rows: Sequence[Sequence[int]]) -> "SuccessorTable":
        """The (vocab, k) table of the updates table[tokens[i]] = rows[i], applied in order (a later row of the
        same token wins): what `Successors.update` leaves, from an empty table. k = the widest row (at most
        MAX_SUCCESSORS); a shorter row is padded with -1."""
        if len(tokens) != len(rows):
            raise KnnSsdError(f"{len(tokens)} tokens but {len(rows)} successor rows",
                              fix="give one row of successors per token")
        k = min(MAX_SUCCESSORS, max((len(row) for row in rows), default=1)) or 1
        table = np.full((vocab, k), -1, dtype=np.int64)
        last = {int(token): i for i, token in enumerate(tokens)}  # the last update of each token wins
        for token, i in last.items():
            if not 0 <= token < vocab:
                raise KnnSsdError(f"a successor row for token {token}, outside the vocabulary of {vocab} ids",
                                  fix="build the table with the model's own vocabulary size")
            row = list(rows[i])[:k]
            table[token, :len(row)] = row
        return cls.of(table)

    @classmethod
    def merged(cls, tables: Sequence["SuccessorTable"]) -> "SuccessorTable | None":
        """One table of `tables` applied in order, a later table's non-empty rows over an earlier's: the table
        of all their updates in that order (`from_updates`); None for no tables. Rows are cut or padded to the
        narrowest k."""
        if not tables:
            return None
        vocab, k = max(t.table.shape[0] for t in tables), min(t.table.shape[1] for t in tables)
        table = np.full((vocab, k), -1, dtype=np.int32)
        for part in tables:
            filled = part.table[:, 0] >= 0
            table[:part.table.shape[0]][filled] = part.table[filled, :k]
        return cls.of(table)


class Successors:
    """One generation's successor table: `k` successors per token, the warm start's unless updated since."""

    def __init__(self, k: int, warm: SuccessorTable | None = None) -> None:
        self.k = k
        self.warm = warm
        self.updated: dict[int, tuple[int, ...]] = {}

    def get(self, token: int) -> tuple[int, ...]:
        """The successors of `token`, best first; () when it has none."""
        found = self.updated.get(token)
        if found is not None:
            return found
        if self.warm is None or not 0 <= token < self.warm.table.shape[0]:
            return ()
        return tuple(t for t in self.warm.table[token, :self.k].tolist() if t >= 0)

    def update(self, tokens: Sequence[int], successors: Sequence[Sequence[int]]) -> None:
        """table[tokens[i]] = successors[i][:k], in order (a later row of the same token wins)."""
        for token, row in zip(tokens, successors):
            self.updated[int(token)] = tuple(row[:self.k])


class SuccessorRecorder:
    """Plain decoding that records `rows`: the top successors (`top_successors`) of each committed token whose
    logits the loop computed, in order; under plain decoding rows[j] follows new token j (the prefill's token is
    row 0). Pass it as the drafter: it proposes nothing, so the loop computes exactly plain decoding."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def start(self) -> "SuccessorRecorder":
        self.rows = []
        return self

    def describe(self) -> dict[str, object]:
        return {"kind": "none"}

    def propose(self, request: DraftRequest) -> Draft:
        return Draft(tokens=torch.empty(0, dtype=torch.long, device=request.last_token.device), probs=None)

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing adapts."""

    def observe_logits(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        self.rows.extend(top_successors(logits))
