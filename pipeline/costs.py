"""What the decoding loop's parts cost on one worker, timed once, and the price of a replayed generation.

A calibration trial's events are deterministic under greedy decoding (`pipeline.replay`); its time is not. So a
trial is scored by pricing its events with a table each worker times at start-up, with repeats:

    verify(w)      one loop step verifying w tokens (w = 1 is a plain decoding step), each timed right after a
                   1-token step as a real decode switches shapes, the cache cropped back so the context stays put;
                   median of `repeats`, made non-decreasing in w (pool-adjacent-violators: a wider pass never
                   costs less), at two contexts (`CONTEXTS`), interpolated in width and context
    draft(S)       one 1-token draft forward of the model skipping S:
                   draft_forward - |S.attn| * attention - |S.mlp| * mlp, the three timed through the real
                   `LayerSkipSession` (nothing skipped, every attention skipped, every MLP skipped)

    predicted seconds of a generation = prefill + sum over steps of (verify(k + 1) + forwards * draft(S))
    plain seconds                     = prefill + (new tokens - 1) * verify(1)
    predicted speedup                 = sum of plain seconds / sum of predicted seconds over the trial's prompts

The same table prices every trial of a worker, so the same policy on the same prompts always scores the same.
Prefill seconds (the trace's own, measured) are the same on both sides of the ratio.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import PreTrainedModel

from knnssd.decoding import GenerationConfig, begin, device_clock, verify
from knnssd.drafters import Draft, DraftRequest, LayerSkipConfig, LayerSkipDrafter
from knnssd.kvcache import rollback
from knnssd.sampling import SamplingConfig
from knnssd.skipset import SkipSet
from knnssd.sublayers import model_lock, num_decoder_layers
from pipeline.replay import Replayed, Trace

TIMED_WIDTHS = (1, 2, 3, 4, 6, 8, 11, 16)  # the search drafts at most 15 tokens: widths up to 16
CONTEXTS = (64, 1024)  # cache lengths the table is timed at (Spec-Bench prompts run from about 30 to 1500 tokens)
DRAFT_FORWARDS = 4  # forwards per timed draft


@dataclass(frozen=True)
class StepCosts:
    """Seconds of the loop's parts on one worker (see the module docstring).

    contexts: the two cache lengths timed; widths: the verify widths timed; verify[c][i]: seconds of a width
    widths[i] step at contexts[c]; draft_forward, attention, mlp: the draft-forward model; threads, device:
    where it was timed.
    """

    contexts: tuple[int, int]
    widths: tuple[int, ...]
    verify: tuple[tuple[float, ...], tuple[float, ...]]
    draft_forward: float
    attention: float
    mlp: float
    threads: int
    device: str

    def verify_seconds(self, width: int, context: int) -> float:
        """One step of `width` tokens at `context` cached tokens: linear in width between timed widths (and
        beyond the widest, along the last segment), linear in context between the two timed contexts."""
        def at(row: tuple[float, ...]) -> float:
            if width <= self.widths[-1]:
                return float(np.interp(width, self.widths, row))
            slope = (row[-1] - row[-2]) / (self.widths[-1] - self.widths[-2])
            return row[-1] + slope * (width - self.widths[-1])

        low, high = self.contexts
        short, long = at(self.verify[0]), at(self.verify[1])
        if high == low:
            return short
        return short + (long - short) * (context - low) / (high - low)

    def draft_seconds(self, skip_set: SkipSet) -> float:
        saved = len(skip_set.attn) * self.attention + len(skip_set.mlp) * self.mlp
        return max(0.0, self.draft_forward - saved)

    def generation_seconds(self, trace: Trace, replayed: Replayed, skip_set: SkipSet | None) -> float:
        """Predicted seconds of decoding `trace`'s prompt with the replayed events."""
        draft = self.draft_seconds(skip_set) if skip_set is not None else 0.0
        context = len(trace.prompt)
        seconds = trace.prefill_seconds
        for step in replayed.steps:
            seconds += self.verify_seconds(step.drafted + 1, context) + step.forwards * draft
            context += step.accepted + 1
        return seconds

    def plain_seconds(self, trace: Trace) -> float:
        """Predicted seconds of plain decoding of `trace`'s prompt."""
        return trace.prefill_seconds + sum(self.verify_seconds(1, len(trace.prompt) + i)
                                           for i in range(len(trace.tokens) - 1))

    def relative(self) -> dict[str, float]:
        """Verify costs in plain steps (v) at the shorter context, for logs and reports."""
        plain = self.verify[0][0]
        return {f"v{w}": cost / plain for w, cost in zip(self.widths, self.verify[0])}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepCosts":
        return cls(contexts=tuple(data["contexts"]), widths=tuple(data["widths"]),
                   verify=tuple(tuple(row) for row in data["verify"]), draft_forward=data["draft_forward"],
                   attention=data["attention"], mlp=data["mlp"], threads=data["threads"], device=data["device"])


def _timed(run: Callable[[], object], clock: Callable[[], float], before: Callable[[], object]) -> float:
    """Seconds of `run()`, right after an untimed `before()` (a 1-token step, as in a real decode)."""
    before()
    start = clock()
    run()
    return clock() - start


@torch.inference_mode()
def _time_context(model: PreTrainedModel, tokens: list[int], widths: tuple[int, ...], repeats: int,
                  rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """With `tokens` (their count is the context) in the cache: median seconds of a verify step per width, and
    of one draft forward with nothing, every attention, every MLP skipped. Each round times every job once, in
    a shuffled order."""
    device = next(model.parameters()).device
    clock = device_clock(device)
    started = begin(model, torch.tensor([tokens], device=device), GenerationConfig(max_new_tokens=2))
    cache, position, last = started.state.cache, len(tokens), started.state.first_token
    sampling = SamplingConfig()
    layers = num_decoder_layers(model)
    drafters = [LayerSkipDrafter(skip, LayerSkipConfig(threshold=0.0, max_draft_tokens=DRAFT_FORWARDS))
                for skip in (SkipSet.of(), SkipSet.of(attn=range(layers)), SkipSet.of(mlp=range(layers)))]
    request = DraftRequest(model=model, cache=cache, last_token=torch.tensor([[last]], device=device),
                           position=position, max_tokens=DRAFT_FORWARDS, sampling=sampling, generator=None,
                           history=list(tokens) + [last])

    def step(width: int) -> Callable[[], None]:
        draft = Draft(tokens=torch.full((width - 1,), last, dtype=torch.long, device=device), probs=None)

        def run() -> None:
            verify(model, cache, last, draft, position, sampling, None)
            rollback(cache, position)
        return run

    jobs = {("verify", w): step(w) for w in widths}
    jobs.update({("draft", i): (lambda d=d: d.start().propose(request)) for i, d in enumerate(drafters)})
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    plain = step(1)
    for _ in range(repeats):
        order = list(jobs)
        rng.shuffle(order)
        for key in order:
            samples[key].append(_timed(jobs[key], clock, plain))
    verify_row = tuple(statistics.median(samples[("verify", w)]) for w in widths)
    draft_row = tuple(statistics.median(samples[("draft", i)]) / DRAFT_FORWARDS for i in range(len(drafters)))
    return verify_row, draft_row


def non_decreasing(values: tuple[float, ...]) -> tuple[float, ...]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks[-2], blocks.pop()
            blocks[-1] = [(m2 * n2 + m1 * n1) / (n2 + n1), n2 + n1]
    return tuple(mean for mean, count in blocks for _ in range(int(count)))


def time_step_costs(model: PreTrainedModel, repeats: int = 9, widths: tuple[int, ...] = TIMED_WIDTHS,
                    contexts: tuple[int, int] = CONTEXTS, seed: int = 0) -> StepCosts:
    """Time the table on `model` at `contexts` (capped to the model's context), a fixed token pattern in the
    cache (what the tokens are does not change what a step costs)."""
    rng = random.Random(seed)
    limit = getattr(model.config, "max_position_embeddings", None) or max(contexts) + 64
    contexts = tuple(min(c, limit - widths[-1] - 8) for c in contexts)  # type: ignore[assignment]
    vocab = int(model.config.vocab_size)
    rows, drafts = [], []
    with model_lock(model):
        for context in contexts:
            row, draft = _time_context(model, [3 + (7 * i) % (vocab - 3) for i in range(context)], widths,
                                       repeats, rng)
            rows.append(non_decreasing(row))
            drafts.append(draft)
    layers = num_decoder_layers(model)
    full, no_attention, no_mlp = (statistics.mean(d[i] for d in drafts) for i in range(3))
    device = next(model.parameters()).device
    return StepCosts(contexts=(contexts[0], contexts[1]), widths=tuple(widths), verify=(rows[0], rows[1]),
                     draft_forward=full, attention=max(0.0, (full - no_attention) / layers),
                     mlp=max(0.0, (full - no_mlp) / layers), threads=torch.get_num_threads(), device=str(device))


def step_costs_for(model: PreTrainedModel, folder: Path, key: str,
                   log: Callable[[str], None] = lambda message: None) -> StepCosts:
    """The table for this worker: read from `folder`/`key`.json when a worker of this machine timed it already
    (so every trial of a run, and of a resumed run, is priced alike), else timed now and written there."""
    path = folder / f"{key}.json"
    if path.is_file():
        try:
            return StepCosts.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            log(f"step costs {path} unreadable; timing them again")
    started = time.perf_counter()
    costs = time_step_costs(model)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(costs.to_dict(), indent=2))
    os.replace(tmp, path)
    log(f"step costs timed in {time.perf_counter() - started:.0f} s: plain step {costs.verify[0][0] * 1e3:.1f} ms, "
        + ", ".join(f"{k} {v:.2f}" for k, v in costs.relative().items() if k != "v1") + f" -> {path}")
    return costs
