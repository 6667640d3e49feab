"""A batch's token budget: how many draft tokens each running request may put into the next verify pass.

A pass over N rows costs `PassCosts.of(N)` seconds (timed on this machine by `time_pass_costs`, through the same
packed pass the batch runs). Every running request puts in one row (its last committed token), which yields one
token for sure. A request's j-th drafted token yields one more token only if it and every draft before it are
accepted: with a per-token acceptance a (`Generation.acceptance`, its running rate with a prior of one accepted and
one rejected token), about a**j expected tokens. `allocate` hands rows out greedily, the highest expected gain first,
and stops when one more row would lower the pass's expected tokens per second:

    (tokens + gain) / cost(rows + 1) <= tokens / cost(rows)

So speculation shrinks by itself as the batch grows (each row costs more once the pass is compute-bound, and more
requests bring more sure tokens to compare with), down to plain batched decoding; no fixed switch-off. A request
alone in the batch keeps its policy's own draft length (the calibrated one): the budget applies from two requests;
a seeded sampled request always keeps it, so that its seed gives the same answer in any batch (`batch_caps`).
For a token tree the budget counts nodes (`knnssd.engine.tree.first_nodes` keeps the first ones), with the same
path estimate, so a tree gets fewer rows than its width would want: a deliberate, conservative simplification.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from transformers import PreTrainedModel

from knnssd.engine.batch import packed_hidden, request_mask
from knnssd.engine.kernels import MAX_BATCH_ROWS, MAX_FAST_ROWS, batched_rows
from knnssd.engine.kvcache import new_cache, rollback
from knnssd.errors import KnnSsdError

if TYPE_CHECKING:
    from knnssd.engine.decoding import Generation

TIMED_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # rows of the timed passes
ROWS_PER_REQUEST = 8  # a timed pass of w rows is ceil(w / 8) requests' rows
MAX_DRAFT = MAX_FAST_ROWS - 1  # the most draft tokens one request puts into a batched pass


@dataclass(frozen=True)
class PassCosts:
    """Seconds of one verify pass by its rows: `seconds[i]` for `widths[i]` rows (widths increasing), linear in
    between and beyond the last width along the last two points' slope."""

    widths: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or len(self.widths) != len(self.seconds) or list(self.widths) != sorted(
                set(self.widths)) or min(self.seconds) <= 0:
            raise KnnSsdError(f"pass costs need two or more increasing widths with positive seconds, got "
                              f"{self.widths} / {self.seconds}", fix="time them with time_pass_costs(model)")

    def of(self, rows: int) -> float:
        """Seconds of a pass of `rows` rows."""
        widths, seconds = self.widths, self.seconds
        for i in range(1, len(widths)):
            if rows <= widths[i] or i == len(widths) - 1:
                w0, w1, s0, s1 = widths[i - 1], widths[i], seconds[i - 1], seconds[i]
                return max(seconds[0], s0 + (s1 - s0) * (rows - w0) / (w1 - w0))
        return seconds[0]

    def relative(self) -> dict[int, float]:
        """Each timed width's cost in 1-row passes."""
        return {w: s / self.seconds[0] for w, s in zip(self.widths, self.seconds)}


def allocate(acceptance: Sequence[float], room: Sequence[int], costs: PassCosts,
             max_rows: int = MAX_BATCH_ROWS) -> list[int]:
    """Draft tokens per request for one pass: acceptance[i] is request i's per-token acceptance (0-1), room[i] the
    most draft tokens it can take (0 for a request that does not draft). Greedy by expected gain a**j, stopping when
    one more row lowers expected tokens per second (the module docstring) or the pass would exceed `max_rows`."""
    caps = [0] * len(acceptance)
    rows, tokens = len(acceptance), float(len(acceptance))
    heap = [(-a, i) for i, a in enumerate(acceptance) if room[i] > 0]
    heapq.heapify(heap)
    while heap and rows < max_rows:
        gain, i = heapq.heappop(heap)
        gain = -gain
        if (tokens + gain) * costs.of(rows) <= tokens * costs.of(rows + 1):
            break
        caps[i] += 1
        rows += 1
        tokens += gain
        if caps[i] < room[i]:
            heapq.heappush(heap, (-(acceptance[i] ** (caps[i] + 1)), i))
    return caps


@torch.inference_mode()
def time_pass_costs(model: PreTrainedModel, widths: Sequence[int] = TIMED_WIDTHS, context: int = 64,
                    repeats: int = 3) -> PassCosts:
    """Time packed verify passes of `widths` rows (ceil(w / ROWS_PER_REQUEST) requests of `context` cached tokens
    each, causal rows), the fastest of `repeats` after one untimed pass (the fastest: other work on the machine
    only ever adds time); each cache is cropped back after each pass.
    About (1 + repeats) x sum of the passes: a few seconds for SmolLM2 on two cores."""
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    limit = getattr(model.config, "max_position_embeddings", None) or context + max(widths) + 8
    context = max(1, min(context, limit - max(widths) - 8))
    requests = -(-max(widths) // ROWS_PER_REQUEST)
    prompt = (torch.arange(context, device=device) * 7 + 3) % vocab
    caches = []
    for _ in range(requests):
        cache = new_cache(model)
        packed_hidden(model, [cache], [prompt], [torch.arange(context, device=device)],
                      [request_mask(0, context, None, device)])
        caches.append(cache)
    seconds = []
    for width in widths:
        count = -(-width // ROWS_PER_REQUEST)
        sizes = [width // count + (1 if i < width % count else 0) for i in range(count)]
        ids = [prompt[:size] for size in sizes]
        positions = [torch.arange(context, context + size, device=device) for size in sizes]
        masks = [request_mask(context, size, None, device) for size in sizes]
        samples = []
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            hidden = packed_hidden(model, caches[:count], ids, positions, masks)
            with batched_rows():
                model.get_output_embeddings()(hidden)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                samples.append(time.perf_counter() - start)
            for cache in caches[:count]:
                rollback(cache, context)
        seconds.append(min(samples))
    # a wider pass never costs less: a noisy narrower timing must not make rows look free
    return PassCosts(widths=tuple(widths), seconds=tuple(itertools.accumulate(seconds, max)))


def batch_caps(generations: Sequence["Generation"], costs: PassCosts | None) -> list[int | None] | None:
    """The caps `knnssd.engine.decoding.step` takes for these running generations: None (each policy's own draft
    length) for one request or without costs, else `allocate` over their acceptance and room.

    A sampled request with a seed keeps its policy's own length (None) whatever it is batched with: rejection
    sampling draws one random number per drafted token, so another length would draw other numbers and the same
    seed would give another (equally distributed) answer. With its own length its answer is its answer alone."""
    if costs is None or len(generations) < 2:
        return None
    fixed = [not g.config.sampling.greedy and g.config.sampling.seed is not None for g in generations]
    wanted = [min(MAX_DRAFT, max(0, g.room)) if g.session is not None else 0 for g in generations]
    room = [0 if fix else w for w, fix in zip(wanted, fixed)]
    reserved = sum(w for w, fix in zip(wanted, fixed) if fix)  # rows a seeded request may bring on its own
    caps = allocate([g.acceptance() for g in generations], room, costs, max_rows=MAX_BATCH_ROWS - reserved)
    return [None if fix else cap for cap, fix in zip(caps, fixed)]
