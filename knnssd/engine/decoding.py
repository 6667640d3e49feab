"""The one decoding loop: plain decoding and every drafter go through `decode`.

    1. prefill: one forward over the prompt fills the cache and gives the first
       new token (and the prompt embedding that routing uses, at no extra cost);
    2. draft: the drafter proposes k >= 0 tokens after the last committed token
       (k = 0 always for plain decoding);
    3. verify: one full-model forward over [last token, drafts] at explicit
       positions gives k + 1 target distributions (a token tree: one forward
       with a tree attention mask, `knnssd.engine.tree`);
    4. accept: the longest acceptable prefix of the drafts plus one bonus token
       (greedy or rejection sampling, see `knnssd.engine.sampling`);
    5. roll back: every cache layer is cropped to the committed tokens;
    6. stop at EOS or `max_new_tokens`, as `model.generate` does.

A `Generation` is one request between steps; `step(model, generations)` runs steps 2-5 for one or many of them,
verifying every request's drafts in one forward pass where the model allows (`knnssd.engine.batch`), and `decode`
is `step` over one generation until it is done: one loop for a request alone and for a server's batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.batch import can_batch, packed_hidden, request_mask
from knnssd.engine.drafters import Draft, DraftRequest, Drafter
from knnssd.errors import KnnSsdError
from knnssd.engine.kernels import MAX_FAST_ROWS, batched_rows, transformers_kernels
from knnssd.engine.kvcache import new_cache, request_reach, rollback
from knnssd.engine.sampling import SamplingConfig, sample, verify_greedy, verify_sampling, warp_probs
from knnssd.engine.stats import GenerationStats, StatsRecorder
from knnssd.engine.sublayers import model_lock
from knnssd.engine.tree import (check_tree, conclude_tree, depths, first_nodes, first_path, nodes_per_depth,
                                tree_mask, within_depth)

Clock = Callable[[], float]
# Called with the tokens each step commits (the prefill's first token alone, then each verify step's accepted
# drafts and bonus token, cut after an EOS), in order; returning False stops generation after those tokens,
# with finish_reason "stopped". How a server streams, and how a stop string, a client that went away or a
# timeout end a generation at the next step.
TokenHook = Callable[[tuple[int, ...]], bool]


@dataclass(frozen=True)
class GenerationConfig:
    """Stop conditions and token choice of one generation.

    `eos_token_ids` None means the model's own (its generation_config's
    eos_token_id); an empty tuple means never stop early.
    """

    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KnnSsdError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
                fix="ask for at least one new token, e.g. --max-new-tokens 64",
            )


@dataclass(frozen=True)
class Prefilled:
    """State after the prefill.

    cache: holds the prompt's `prompt_length` tokens.
    prompt_tokens: the prompt's token ids (drafters that look text up read them).
    first_token: the first new token (not in the cache yet).
    embedding: (hidden,) float32 final-layer hidden state mean-pooled over the prompt.
    """

    cache: DynamicCache
    prompt_length: int
    prompt_tokens: tuple[int, ...]
    first_token: int
    embedding: torch.Tensor
    seconds: float


@dataclass(frozen=True)
class GenerationResult:
    """token_ids: the new tokens only (the prompt excluded); finish_reason "eos", "length", or "stopped" (the
    `on_tokens` hook returned False before EOS or `max_new_tokens`)."""

    token_ids: tuple[int, ...]
    stats: GenerationStats
    finish_reason: str
    embedding: torch.Tensor


def device_clock(device: torch.device) -> Clock:
    """perf_counter that first waits for queued CUDA work, so phases are timed honestly."""
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


def model_eos_ids(model: PreTrainedModel) -> tuple[int, ...]:
    """The model's EOS ids from its generation config (int or list), as a tuple."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def check_prompt(model: PreTrainedModel, prompt_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse empty, batched or over-long prompts with a clear error."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise KnnSsdError(
            f"prompt_ids must have shape (1, prompt_length), got {tuple(prompt_ids.shape)}",
            fix="generate one prompt at a time; batch size 1 is what self-speculative decoding serves",
        )
    if prompt_ids.shape[1] == 0:
        raise KnnSsdError("the prompt is empty", fix="give a prompt of at least one token")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_ids.shape[1] + max_new_tokens > context:
        raise KnnSsdError(
            f"prompt ({prompt_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {context} tokens",
            fix="shorten the prompt or lower max_new_tokens",
        )


def first_choice(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """Token chosen from one row of logits (vocab,) by argmax or by sampling."""
    if sampling.greedy:
        return int(logits.argmax(dim=-1))
    return int(sample(warp_probs(logits, sampling), generator))


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    clock: Clock,
    max_new_tokens: int | None = None,
) -> Prefilled:
    """Step 1: one forward over `prompt_ids` (1, T).

    `max_new_tokens`, when given, caps the cache at the request's reach (`knnssd.engine.kvcache.request_reach`:
    prompt + max_new_tokens + the widest fast verify pass; a wider pass still fits, the cache grows for it);
    None lets it grow as needed.

    Runs the base model and the LM head on the last position only, which is what
    `model(..., logits_to_keep=1)` computes, and keeps the final hidden states
    (1, T, hidden) long enough to mean-pool them into the prompt embedding.
    """
    start = clock()
    length = prompt_ids.shape[1]
    cache = new_cache(model, None if max_new_tokens is None else request_reach(length, max_new_tokens))
    position_ids = torch.arange(length, device=prompt_ids.device).unsqueeze(0)
    with model_lock(model), transformers_kernels(model):  # a prefill computes as transformers' does, for every drafter
        hidden = model.model(input_ids=prompt_ids, position_ids=position_ids, cache=cache,
                             use_cache=True).last_hidden_state
    logits = model.lm_head(hidden[:, -1:, :])[0, -1]  # (vocab,)
    embedding = hidden[0].float().mean(dim=0)  # (hidden,)
    token = first_choice(logits, sampling, generator)
    return Prefilled(cache=cache, prompt_length=length, prompt_tokens=tuple(prompt_ids[0].tolist()),
                     first_token=token, embedding=embedding, seconds=clock() - start)


def project_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on `hidden` (n, hidden) -> logits (n, vocab). The head is the largest matrix of a small model;
    `knnssd.engine.kernels.accelerate` (at load) gives it the fastest small-batch method for its shape."""
    return model.get_output_embeddings()(hidden)


OnLogits = Callable[[torch.Tensor, torch.Tensor], None]  # (tokens (n,), logits (n, vocab)) of committed rows


@dataclass(frozen=True)
class PassRows:
    """One request's rows in a verify pass.

    draft: what is verified: a path, or (greedy only) a token tree.
    input_ids: (n,) [last committed token, drafts or tree nodes]; positions: (n,) each row's position.
    position: the last committed token's position; the cache holds exactly `position` tokens before the pass.
    """

    draft: Draft
    input_ids: torch.Tensor
    positions: torch.Tensor
    position: int

    @property
    def parents(self) -> list[int] | None:
        return self.draft.parents.tolist() if self.draft.parents is not None else None


def pass_rows(last_token: int, draft: Draft, position: int, greedy: bool) -> PassRows:
    """The rows verifying `draft` after `last_token` at `position`: a tree keeps its nodes under greedy decoding
    (each at the position of its depth) and is reduced to its first path under sampling."""
    if draft.parents is not None and not greedy:
        draft = first_path(draft)
    device = draft.tokens.device
    input_ids = torch.cat([torch.tensor([last_token], device=device), draft.tokens])  # (n,)
    if draft.parents is None:
        positions = torch.arange(position, position + input_ids.shape[0], device=device)
    else:
        positions = position + torch.tensor([0] + depths(draft.parents.tolist()), device=device)
    return PassRows(draft=draft, input_ids=input_ids, positions=positions, position=position)


def conclude(cache: DynamicCache, rows: PassRows, logits: torch.Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None, on_logits: OnLogits | None = None) -> tuple[list[int], int]:
    """Steps 4-5 after the pass over `rows` gave logits (n, vocab): (accepted draft tokens, next token), the cache
    cropped to the committed tokens. `on_logits`, when given, gets the committed rows (the last token's and the
    accepted drafts'): a session's `observe_logits`."""
    draft = rows.draft
    if draft.parents is not None:
        return conclude_tree(cache, rows.input_ids, draft, logits, rows.position, on_logits)
    if sampling.greedy:
        n_accepted, next_token = verify_greedy(draft.tokens, logits)
    else:
        n_accepted, next_token = verify_sampling(draft.tokens, draft.probs, warp_probs(logits, sampling), generator)
    if on_logits is not None:
        on_logits(rows.input_ids[:n_accepted + 1], logits[:n_accepted + 1])
    rollback(cache, rows.position + 1 + n_accepted)
    return draft.tokens[:n_accepted].tolist(), next_token


def verify(
    model: PreTrainedModel,
    cache: DynamicCache,
    last_token: int,
    draft: Draft,
    position: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    on_logits: OnLogits | None = None,
) -> tuple[list[int], int]:
    """Steps 3-5 for one request's draft of k tokens after `last_token` (at `position`; the cache holds exactly the
    `position` committed tokens): returns (accepted draft tokens, next_token), the cache cropped to the committed
    tokens. A token tree (draft.parents set) is verified in one pass with its tree mask
    (`knnssd.engine.tree.tree_mask`) under greedy decoding; under sampling only its first path is verified."""
    return verify_rows(model, cache, pass_rows(last_token, draft, position, sampling.greedy), sampling, generator,
                       on_logits)


def verify_rows(model: PreTrainedModel, cache: DynamicCache, rows: PassRows, sampling: SamplingConfig,
                generator: torch.Generator | None, on_logits: OnLogits | None = None) -> tuple[list[int], int]:
    """`verify` for rows already laid out (`pass_rows`): one pass of this request alone, a tree with its mask."""
    parents = rows.parents
    mask = {"attention_mask": tree_mask(model, cache, parents, rows.position)} if parents is not None else {}
    hidden = model.model(input_ids=rows.input_ids[None], position_ids=rows.positions[None], cache=cache,
                         use_cache=True, **mask).last_hidden_state[0]  # (n, hidden)
    return conclude(cache, rows, project_logits(model, hidden), sampling, generator, on_logits)


def within_contract(draft: Draft, max_tokens: int, cache: DynamicCache, position: int, drafter: Drafter,
                    greedy: bool = True) -> Draft:
    """Hold any drafter, a user's own included, to the loop's contract: a draft longer than `max_tokens` is cut
    (so `max_new_tokens` is never overshot), and the cache is cropped back to the `position` committed tokens
    (a drafter that removed committed state is refused). A token tree is checked, cut to depth `max_tokens`
    (a tree commits at most its depth), and under sampling reduced to its first path."""
    for index, layer in enumerate(cache.layers):
        held = layer.get_seq_length()
        if held < position and getattr(layer, "is_initialized", True):
            raise KnnSsdError(
                f"drafter {type(drafter).__name__} left cache layer {index} with {held} tokens, fewer than the "
                f"{position} committed",
                fix="a drafter must leave the cache at request.position tokens (knnssd.engine.kvcache.rollback does that)")
    rollback(cache, position)
    if draft.parents is not None:
        check_tree(draft, type(drafter).__name__)
        draft = within_depth(draft, max_tokens) if greedy else first_path(draft)
    if draft.parents is not None or draft.tokens.shape[0] <= max_tokens:
        return draft
    probs = draft.probs[:max_tokens] if draft.probs is not None else None
    return Draft(tokens=draft.tokens[:max_tokens], probs=probs, forwards=draft.forwards)


class Generation:
    """One request between steps: what the loop keeps (every committed token, the cache's position, the stats, the
    drafter's session) and the hook that sees each step's tokens. `step` advances a list of them by one
    draft-and-verify step, verifying all of them in one pass where it can; `decode` runs one to its end."""

    def __init__(self, model: PreTrainedModel, state: Prefilled, config: GenerationConfig,
                 drafter: Drafter | None = None, generator: torch.Generator | None = None,
                 clock: Clock | None = None, on_tokens: TokenHook | None = None) -> None:
        self.state, self.config, self.drafter, self.generator = state, config, drafter, generator
        self.device = next(model.parameters()).device
        self.clock = clock or device_clock(self.device)
        self.started = self.clock()
        self.eos = set(model_eos_ids(model) if config.eos_token_ids is None else config.eos_token_ids)
        self.recorder = StatsRecorder(prefill_seconds=state.seconds)
        self.session = drafter.start() if drafter is not None else None
        self.observe_logits: OnLogits | None = getattr(self.session, "observe_logits", None)  # optional
        self.history = list(state.prompt_tokens) + [state.first_token]  # every committed token, prompt first
        self.end = state.prompt_length + config.max_new_tokens  # history length at max_new_tokens
        self.position = state.prompt_length  # tokens in the cache; history[-1] sits at this position
        self.on_tokens = on_tokens
        self.going = on_tokens is None or on_tokens((state.first_token,)) is not False

    @property
    def done(self) -> bool:
        return not self.going or len(self.history) >= self.end or self.history[-1] in self.eos

    @property
    def cache(self) -> DynamicCache:
        return self.state.cache

    @property
    def room(self) -> int:
        """The most draft tokens the next step may verify: drafts plus the bonus token stay within max_new_tokens."""
        return self.end - len(self.history) - 1

    def tally(self) -> tuple[int, int]:
        """(drafted, accepted) tokens so far."""
        return sum(self.recorder.drafted_by_position), sum(self.recorder.accepted_by_position)

    def acceptance(self) -> float:
        """The chance that a drafted token is accepted, from this generation's steps so far, with one accepted and
        one rejected token as a prior (1/2 before any draft): what a batch's token budget ranks requests by."""
        drafted, accepted = self.tally()
        return (accepted + 1) / (drafted + 2)

    def propose(self, model: PreTrainedModel, cap: int | None = None) -> Draft:
        """Step 2: the drafter's draft after the last committed token (empty for plain decoding), held to the
        loop's contract and to at most `cap` tokens (a batch's budget; None: the policy's own length)."""
        limit = self.room if cap is None else min(self.room, cap)
        if self.session is None or limit < 1:
            return Draft(tokens=torch.empty(0, dtype=torch.long, device=self.device), probs=None)
        t0 = self.clock()
        last = torch.tensor([[self.history[-1]]], device=self.device)
        draft = self.session.propose(DraftRequest(
            model=model, cache=self.cache, last_token=last, position=self.position, max_tokens=limit,
            sampling=self.config.sampling, generator=self.generator, history=self.history))
        draft = within_contract(draft, limit, self.cache, self.position, self.drafter, self.config.sampling.greedy)
        if cap is not None and draft.parents is not None:
            draft = first_nodes(draft, cap)
        self.recorder.draft_seconds += self.clock() - t0
        return draft

    def rows(self, draft: Draft) -> PassRows:
        return pass_rows(self.history[-1], draft, self.position, self.config.sampling.greedy)

    def conclude(self, rows: PassRows, logits: torch.Tensor) -> tuple[list[int], int]:
        return conclude(self.cache, rows, logits, self.config.sampling, self.generator, self.observe_logits)

    def commit(self, draft: Draft, accepted: list[int], next_token: int, seconds: float) -> None:
        """Step 6's bookkeeping after a verify pass of `seconds` (a batched pass's whole time: each request
        waited for all of it): stats, the committed tokens (cut after an EOS), the hook."""
        self.recorder.verify_seconds += seconds
        drafted = draft.tokens.shape[0]
        if self.session is not None:
            self.session.observe(drafted, len(accepted))
        self.recorder.record_step(drafted, len(accepted), draft.forwards, nodes_per_depth(draft))
        committed = len(self.history)
        for token in accepted + [next_token]:
            self.history.append(token)
            if token in self.eos:
                break
        self.position += 1 + len(accepted)
        self.going = self.on_tokens is None or self.on_tokens(tuple(self.history[committed:])) is not False

    def result(self) -> GenerationResult:
        tokens = tuple(self.history[self.state.prompt_length:])
        finish = ("eos" if tokens[-1] in self.eos else "stopped" if not self.going and len(self.history) < self.end
                  else "length")
        stats = self.recorder.finish(new_tokens=len(tokens),
                                     total_seconds=self.state.seconds + self.clock() - self.started)
        return GenerationResult(token_ids=tokens, stats=stats, finish_reason=finish, embedding=self.state.embedding)


@torch.inference_mode()
def step(model: PreTrainedModel, generations: list[Generation], caps: list[int | None] | None = None) -> None:
    """One loop step for every generation that is not done: each drafts (at most caps[i] tokens where given),
    then one verify pass over every request's rows (`knnssd.engine.batch`), or one pass per request where the
    model or a cache cannot be batched (`can_batch`); a request of more than MAX_FAST_ROWS rows gets its own pass.
    A request's greedy output does not depend on what it is batched with: with the batch-invariant kernels (`knnssd.engine.kernels`) its rows compute the bits they
    compute alone; with library products, up to near-ties."""
    live = [(g, cap) for g, cap in zip(generations, caps or [None] * len(generations)) if not g.done]
    if not live:
        return
    with model_lock(model):
        drafts = [g.propose(model, cap) for g, cap in live]
        rows = [g.rows(draft) for (g, _), draft in zip(live, drafts)]
        # a request wider than one request's widest pass is verified alone, as it would be alone (its products
        # are F.linear's there, not the kernel's)
        packed = [i for i, r in enumerate(rows) if r.input_ids.shape[0] <= MAX_FAST_ROWS]
        if len(packed) < 2 or not can_batch(model, [live[i][0].cache for i in packed],
                                            sum(rows[i].input_ids.shape[0] for i in packed)):
            packed = []
        if packed:
            chosen = [rows[i] for i in packed]
            clock = live[packed[0]][0].clock
            t0 = clock()
            masks = [request_mask(r.position, r.input_ids.shape[0], r.parents, r.input_ids.device) for r in chosen]
            hidden = packed_hidden(model, [live[i][0].cache for i in packed], [r.input_ids for r in chosen],
                                   [r.positions for r in chosen], masks)  # (N, hidden)
            with batched_rows():
                logits = project_logits(model, hidden)  # (N, vocab)
            outcomes, start = [], 0
            for i, r in zip(packed, chosen):
                stop = start + r.input_ids.shape[0]
                outcomes.append(live[i][0].conclude(r, logits[start:stop]))
                start = stop
            seconds = clock() - t0
            for i, (accepted, next_token) in zip(packed, outcomes):
                live[i][0].commit(drafts[i], accepted, next_token, seconds)
        for i, ((g, _), draft) in enumerate(zip(live, drafts)):
            if i in packed:
                continue
            t0 = g.clock()
            accepted, next_token = verify_rows(model, g.cache, rows[i], g.config.sampling, g.generator,
                                               g.observe_logits)
            g.commit(draft, accepted, next_token, g.clock() - t0)


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    state: Prefilled,
    config: GenerationConfig,
    drafter: Drafter | None = None,
    generator: torch.Generator | None = None,
    clock: Clock | None = None,
    on_tokens: TokenHook | None = None,
) -> GenerationResult:
    """Steps 2-6 after `prefill`: generate until EOS, `config.max_new_tokens`, or `on_tokens` returns False.

    Holds `model_lock(model)` throughout: one model serves one generation at a time (a server batches
    generations with `step` instead)."""
    with model_lock(model):
        generation = Generation(model, state, config, drafter, generator, clock, on_tokens)
        run_to_end(model, generation)
        return generation.result()


def run_to_end(model: PreTrainedModel, generation: Generation) -> None:
    """Step one generation alone until it is done (the loop `decode` and a runtime's `generate` run)."""
    with model_lock(model):
        while not generation.done:
            step(model, [generation])


def make_generator(device: torch.device, sampling: SamplingConfig) -> torch.Generator | None:
    """A seeded generator for sampling (None for greedy or when no seed is given)."""
    if sampling.greedy or sampling.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


@dataclass(frozen=True)
class Started:
    """A prefilled generation ready for `decode`, with the generator and clock it must keep using."""

    state: Prefilled
    generator: torch.Generator | None
    clock: Clock


def begin(model: PreTrainedModel, prompt_ids: torch.Tensor, config: GenerationConfig,
          clock: Clock | None = None) -> Started:
    """Check the prompt (1, T), move it to the model's device, seed sampling, and prefill."""
    check_prompt(model, prompt_ids, config.max_new_tokens)
    device = next(model.parameters()).device
    clock = clock or device_clock(device)
    generator = make_generator(device, config.sampling)
    state = prefill(model, prompt_ids.to(device), config.sampling, generator, clock, config.max_new_tokens)
    return Started(state=state, generator=generator, clock=clock)


def generate(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    config: GenerationConfig = GenerationConfig(),
    drafter: Drafter | None = None,
    clock: Clock | None = None,
    on_tokens: TokenHook | None = None,
) -> GenerationResult:
    """Generate after `prompt_ids` (1, T) with `drafter`, or plainly when it is None.

    Greedy output (temperature 0) with any drafter is plain decoding's (`drafter`
    None), token for token: where the engine's batch-invariant kernels run (fp32 on
    an x86 CPU with AVX-512 or AVX2, `knnssd.engine.kernels`), a verify row computes
    the bits of the 1-token plain step at its position, so this holds by
    construction (tests/test_batch_invariance.py). Elsewhere (library products, a
    GPU, bf16) verify rows round differently from plain steps and identity holds
    except at numerical near-ties. transformers' ``model.generate`` computes with
    its own products: equal up to near-ties (benchmarks/near_ties.py measures how
    often). Sampled output follows the target model's distribution.

    Example:
        >>> loaded = load_model("smollm2-135m")
        >>> ids = encode_prompt(loaded.tokenizer, "The capital of France is")
        >>> result = generate(loaded.model, ids, GenerationConfig(max_new_tokens=32),
        ...                   LayerSkipDrafter(SkipSet.of(attn=[24, 25, 26])))
        >>> result.stats.mean_accepted_tokens
    """
    with model_lock(model):
        started = begin(model, prompt_ids, config, clock)
        return decode(model, started.state, config, drafter, started.generator, started.clock, on_tokens)


def warm_up(model: PreTrainedModel, prompt_ids: torch.Tensor, drafter: Drafter | None = None) -> None:
    """One tiny untimed generation (the first 8 prompt tokens, 2 new ones), so that one-off costs (allocations,
    lazy imports, first kernel calls) do not land on the first timed run."""
    generate(model, prompt_ids[:, :8], GenerationConfig(max_new_tokens=2, eos_token_ids=()), drafter)
