"""What the decoding loop's parts cost on one worker, timed once, and the price of a replayed generation.

A calibration trial's events are deterministic under greedy decoding (`pipeline.replay`); its time is not. So a
trial is scored by pricing its events with a table each node times once, with repeats:

    verify(w, c)   one loop step verifying w tokens (w = 1 is a plain decoding step) with c tokens cached, each
                   timed right after a 1-token step as a real decode switches shapes, the cache cropped back so
                   the context stays put; median of `repeats`, made non-decreasing in w from w = 2 on (a
                   wider pass of the same kernel never costs less; the 1-token step, F.linear, is kept as timed:
                   it may cost more than a 2-16-token kernel pass, BENCHMARKS.md 23), at two contexts (`CONTEXTS`), interpolated in width and context
    draft(S, c)    one 1-token draft forward of the model skipping S with c tokens cached:
                   draft_forward(c) - |S.attn| * attention(c) - |S.mlp| * mlp(c), the three timed through the real
                   `LayerSkipSession` (nothing skipped, every attention skipped, every MLP skipped) at both
                   contexts and interpolated in context, as verify passes are
    prefill(T)     the prefill of a T-token prompt, timed at the two contexts and interpolated in T

    predicted seconds of a generation = prefill(T) + sum over steps of (verify(k + 1, c) + forwards * draft(S, c'))
                                        (c: the step's cached tokens; c': the mean context of its draft forwards)
    plain seconds                     = prefill(T) + sum over the new tokens but the first of verify(1, c)
    predicted speedup                 = sum of plain seconds / sum of predicted seconds over the trial's prompts

Nothing measured during a trial enters its price: the same policy on the same prompts, priced by the same table,
scores the same to the last digit, whichever worker traced the prompts (greedy decoding gives every worker of a
node the same tokens, and the prefill is priced from the table, not from the trace's own clock). Workers on one
node share one table: the first to need it times it under a lock beside the file (`step_costs_for`), the others
wait and read it. Workers on other nodes time their own table, so their scores of one policy differ by what
their machines differ in.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock
from transformers import PreTrainedModel

from knnssd.engine.decoding import GenerationConfig, begin, device_clock, prefill, verify
from knnssd.engine.drafters import Draft, DraftRequest, LayerSkipConfig, LayerSkipDrafter
from knnssd.engine.kernels import KernelPlan
from knnssd.engine.kvcache import rollback
from knnssd.engine.models import LoadedModel
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.skipset import SkipSet
from knnssd.engine.sublayers import model_lock, num_decoder_layers
from pipeline.replay import Replayed, Trace

TIMED_WIDTHS = (1, 2, 3, 4, 6, 8, 11, 16)  # the search drafts at most 15 tokens: widths up to 16
CONTEXTS = (64, 1024)  # cache lengths the table is timed at (Spec-Bench prompts run from about 30 to 1500 tokens)
DRAFT_FORWARDS = 4  # forwards per timed draft


Pair = tuple[float, float]


def _pair(value: float | Pair) -> Pair:
    return (float(value), float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))


@dataclass(frozen=True)
class StepCosts:
    """Seconds of the loop's parts on one worker (see the module docstring).

    contexts: the two cache lengths timed; widths: the verify widths timed; verify[c][i]: seconds of a width
    widths[i] step at contexts[c]; draft_forward, attention, mlp: the draft-forward model at each context (a
    single number stands for both); prefill: seconds of a prefill of contexts[c] tokens; threads, device: where
    it was timed.
    """

    contexts: tuple[int, int]
    widths: tuple[int, ...]
    verify: tuple[tuple[float, ...], tuple[float, ...]]
    draft_forward: Pair
    attention: Pair
    mlp: Pair
    threads: int
    device: str
    prefill: Pair = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("draft_forward", "attention", "mlp", "prefill"):
            object.__setattr__(self, name, _pair(getattr(self, name)))

    def _at(self, pair: Pair, context: float) -> float:
        """`pair` (one value per timed context) at `context`, linear in context (extended beyond both ends)."""
        low, high = self.contexts
        if high == low:
            return pair[0]
        return pair[0] + (pair[1] - pair[0]) * (context - low) / (high - low)

    def verify_seconds(self, width: int, context: float) -> float:
        """One step of `width` tokens at `context` cached tokens: linear in width between timed widths (and
        beyond the widest, along the last segment), linear in context between the two timed contexts."""
        def at(row: tuple[float, ...]) -> float:
            if width <= self.widths[-1]:
                return float(np.interp(width, self.widths, row))
            slope = (row[-1] - row[-2]) / (self.widths[-1] - self.widths[-2])
            return row[-1] + slope * (width - self.widths[-1])

        return self._at((at(self.verify[0]), at(self.verify[1])), context)

    def draft_seconds(self, skip_set: SkipSet, context: float) -> float:
        """One draft forward of the model skipping `skip_set` at `context` cached tokens."""
        saved = len(skip_set.attn) * self._at(self.attention, context) + len(skip_set.mlp) * self._at(self.mlp, context)
        return max(0.0, self._at(self.draft_forward, context) - saved)

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """The prefill of a `prompt_tokens`-token prompt."""
        return max(0.0, self._at(self.prefill, prompt_tokens))

    def generation_seconds(self, trace: Trace, replayed: Replayed, skip_set: SkipSet | None) -> float:
        """Predicted seconds of decoding `trace`'s prompt with the replayed events."""
        context = len(trace.prompt)
        seconds = self.prefill_seconds(context)
        for step in replayed.steps:
            seconds += self.verify_seconds(step.width, context)  # a tree pass priced as a path of its width
            if skip_set is not None and step.forwards:  # forward i of the step sees context + i cached tokens
                seconds += step.forwards * self.draft_seconds(skip_set, context + (step.forwards - 1) / 2)
            context += step.accepted + 1
        return seconds

    def plain_seconds(self, trace: Trace) -> float:
        """Predicted seconds of plain decoding of `trace`'s prompt."""
        return self.prefill_seconds(len(trace.prompt)) + sum(self.verify_seconds(1, len(trace.prompt) + i)
                                                             for i in range(len(trace.tokens) - 1))

    def relative(self) -> dict[str, float]:
        """Verify costs in plain steps (v) at the shorter context, for logs and reports."""
        plain = self.verify[0][0]
        return {f"v{w}": cost / plain for w, cost in zip(self.widths, self.verify[0])}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepCosts":
        """The table `to_dict` wrote; a table without a timed prefill (an older format) raises KeyError."""
        return cls(contexts=tuple(data["contexts"]), widths=tuple(data["widths"]),
                   verify=tuple(tuple(row) for row in data["verify"]), draft_forward=data["draft_forward"],
                   attention=data["attention"], mlp=data["mlp"], threads=data["threads"], device=data["device"],
                   prefill=data["prefill"])


def _timed(run: Callable[[], object], clock: Callable[[], float], before: Callable[[], object]) -> float:
    """Seconds of `run()`, right after an untimed `before()` (a 1-token step, as in a real decode)."""
    before()
    start = clock()
    run()
    return clock() - start


@torch.inference_mode()
def _time_context(model: PreTrainedModel, tokens: list[int], widths: tuple[int, ...], repeats: int,
                  rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """With `tokens` (their count is the context) in the cache: median seconds of a verify step per width, of
    one draft forward with nothing, every attention, every MLP skipped, and of the prefill of `tokens`. Each
    round times every job once, in a shuffled order."""
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
    prompt = torch.tensor([tokens], device=device)
    jobs[("prefill", 0)] = lambda: prefill(model, prompt, sampling, None, clock)
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    plain = step(1)
    for _ in range(repeats):
        order = list(jobs)
        rng.shuffle(order)
        for key in order:
            samples[key].append(_timed(jobs[key], clock, plain))
    verify_row = tuple(statistics.median(samples[("verify", w)]) for w in widths)
    draft_row = tuple(statistics.median(samples[("draft", i)]) / DRAFT_FORWARDS for i in range(len(drafters)))
    return verify_row, draft_row, statistics.median(samples[("prefill", 0)])


def non_decreasing(values: tuple[float, ...]) -> tuple[float, ...]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks[-2], blocks.pop()
            blocks[-1] = [(m2 * n2 + m1 * n1) / (n2 + n1), n2 + n1]
    return tuple(mean for mean, count in blocks for _ in range(int(count)))


def monotone_passes(row: tuple[float, ...]) -> tuple[float, ...]:
    """A timed verify row (width 1 first): the 1-token step as timed (pooled, it was priced at 23 ms for 40 on
    2026-12-01), the wider passes made non-decreasing."""
    return (row[0], *non_decreasing(row[1:]))


def time_step_costs(model: PreTrainedModel, repeats: int = 9, widths: tuple[int, ...] = TIMED_WIDTHS,
                    contexts: tuple[int, int] = CONTEXTS, seed: int = 0) -> StepCosts:
    """Time the table on `model` at `contexts` (capped to the model's context), a fixed token pattern in the
    cache (what the tokens are does not change what a step costs)."""
    rng = random.Random(seed)
    limit = getattr(model.config, "max_position_embeddings", None) or max(contexts) + 64
    contexts = tuple(min(c, limit - widths[-1] - 8) for c in contexts)  # type: ignore[assignment]
    vocab = int(model.config.vocab_size)
    rows, drafts, prefills = [], [], []
    with model_lock(model):
        for context in contexts:
            row, draft, seconds = _time_context(model, [3 + (7 * i) % (vocab - 3) for i in range(context)], widths,
                                                repeats, rng)
            rows.append(monotone_passes(row))
            drafts.append(draft)
            prefills.append(seconds)
    layers = num_decoder_layers(model)
    full = tuple(d[0] for d in drafts)
    attention = tuple(max(0.0, (d[0] - d[1]) / layers) for d in drafts)
    mlp = tuple(max(0.0, (d[0] - d[2]) / layers) for d in drafts)
    device = next(model.parameters()).device
    return StepCosts(contexts=(contexts[0], contexts[1]), widths=tuple(widths), verify=(rows[0], rows[1]),
                     draft_forward=full, attention=attention, mlp=mlp, threads=torch.get_num_threads(),
                     device=str(device), prefill=tuple(prefills))


def kernel_key(plan: KernelPlan | None) -> str:
    """The kernel plan a table was timed with, in its file name: "plain" without fast kernels, else "fast-"
    and 8 hex digits over the method of every row count and the attention switch, so a table timed with the
    C++ kernel is never read after a fallback to library calls (or the reverse)."""
    if plan is None or not plan.enabled:
        return "plain"
    methods = json.dumps({"rows": list(plan.rows), "attention": plan.attention})
    return "fast-" + hashlib.sha256(methods.encode()).hexdigest()[:8]


TABLE_VERSION = 2  # 2: the 1-token step kept as timed (`monotone_passes`); 1 pooled it with wider passes


def table_key(loaded: LoadedModel) -> str:
    """What a step-cost table is valid for: this machine, the model, device, dtype, threads and kernel plan, and
    how tables are made (TABLE_VERSION), so a table of an older method is timed again, not read."""
    return (f"{socket.gethostname()}-{loaded.model_hash[:12]}-{loaded.device.type}-"
            f"{str(loaded.dtype).removeprefix('torch.')}-{loaded.threads}t-{kernel_key(loaded.kernels)}"
            f"-t{TABLE_VERSION}")


def _read(path: Path, log: Callable[[str], None]) -> StepCosts | None:
    if not path.is_file():
        return None
    try:
        return StepCosts.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        log(f"step costs {path} unreadable or of an older format; timing them again")
        return None


def step_costs_for(model: PreTrainedModel, folder: Path, key: str,
                   log: Callable[[str], None] = lambda message: None,
                   timer: Callable[[PreTrainedModel], StepCosts] = time_step_costs) -> StepCosts:
    """The table for this worker: read from `folder`/`key`.json when a worker of this machine timed it already
    (so every trial of a run, and of a resumed run, is priced alike), else timed now (`timer`) and written there.

    Under a lock file beside the table (`key`.json.lock): workers starting together on a fresh node do not time
    each other's load; the first times the table, the others wait for it and read it. The operating system
    releases the lock of a worker that dies while timing, and the next worker times the table itself."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    with FileLock(str(path) + ".lock"):
        costs = _read(path, log)
        if costs is not None:
            return costs
        started = time.perf_counter()
        costs = timer(model)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(costs.to_dict(), indent=2))
        os.replace(tmp, path)
    log(f"step costs timed in {time.perf_counter() - started:.0f} s: plain step {costs.verify[0][0] * 1e3:.1f} ms, "
        + ", ".join(f"{k} {v:.2f}" for k, v in costs.relative().items() if k != "v1") + f" -> {path}")
    return costs
