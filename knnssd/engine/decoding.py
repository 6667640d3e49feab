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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.drafters import Draft, DraftRequest, Drafter
from knnssd.errors import KnnSsdError
from knnssd.engine.kernels import transformers_kernels
from knnssd.engine.kvcache import new_cache, request_reach, rollback
from knnssd.engine.sampling import SamplingConfig, sample, verify_greedy, verify_sampling, warp_probs
from knnssd.engine.stats import GenerationStats, StatsRecorder
from knnssd.engine.sublayers import model_lock
from knnssd.engine.tree import check_tree, first_path, nodes_per_depth, verify_tree, within_depth

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


def verify(
    model: PreTrainedModel,
    cache: DynamicCache,
    last_token: int,
    draft: Draft,
    position: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[list[int], int]:
    """Steps 3-5 for one draft of k tokens after `last_token` (at `position`; the cache holds exactly the
    `position` committed tokens): returns (accepted draft tokens, next_token), the cache cropped to the committed
    tokens. A token tree (draft.parents set) goes to `knnssd.engine.tree.verify_tree` under greedy decoding; under
    sampling only its first path is verified. `on_logits(tokens (n,), logits (n, vocab))`, when given, gets the
    pass's committed rows (`last_token` and the accepted drafts): a session's `observe_logits`."""
    if draft.parents is not None:
        if sampling.greedy:
            return verify_tree(model, cache, last_token, draft, position, on_logits)
        draft = first_path(draft)
    device = draft.tokens.device
    k = draft.tokens.shape[0]
    input_ids = torch.cat([torch.tensor([last_token], device=device), draft.tokens]).unsqueeze(0)  # (1, k + 1)
    position_ids = torch.arange(position, position + k + 1, device=device).unsqueeze(0)
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, cache=cache,
                         use_cache=True).last_hidden_state[0]  # (k + 1, hidden)
    logits = project_logits(model, hidden)  # (k + 1, vocab)
    if sampling.greedy:
        n_accepted, next_token = verify_greedy(draft.tokens, logits)
    else:
        n_accepted, next_token = verify_sampling(draft.tokens, draft.probs, warp_probs(logits, sampling), generator)
    if on_logits is not None:
        on_logits(input_ids[0, :n_accepted + 1], logits[:n_accepted + 1])
    rollback(cache, position + 1 + n_accepted)
    return draft.tokens[:n_accepted].tolist(), next_token


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

    Holds `model_lock(model)` throughout: one model serves one generation at a time."""
    with model_lock(model):
        return _decode(model, state, config, drafter, generator, clock, on_tokens)


def _decode(model: PreTrainedModel, state: Prefilled, config: GenerationConfig, drafter: Drafter | None,
            generator: torch.Generator | None, clock: Clock | None,
            on_tokens: TokenHook | None = None) -> GenerationResult:
    device = next(model.parameters()).device
    clock = clock or device_clock(device)
    start = clock()
    eos = set(model_eos_ids(model) if config.eos_token_ids is None else config.eos_token_ids)
    recorder = StatsRecorder(prefill_seconds=state.seconds)
    session = drafter.start() if drafter is not None else None
    observe_logits = getattr(session, "observe_logits", None)  # optional (`DraftSession`)
    empty = Draft(tokens=torch.empty(0, dtype=torch.long, device=device), probs=None)
    history = list(state.prompt_tokens) + [state.first_token]  # every committed token, prompt first
    end = state.prompt_length + config.max_new_tokens  # history length at max_new_tokens
    position = state.prompt_length  # tokens in the cache; history[-1] sits at this position
    going = on_tokens is None or on_tokens((state.first_token,)) is not False
    while going and len(history) < end and history[-1] not in eos:
        budget = end - len(history)  # room for drafts plus the bonus token
        draft = empty
        if session is not None and budget > 1:
            t0 = clock()
            last = torch.tensor([[history[-1]]], device=device)
            draft = session.propose(DraftRequest(model=model, cache=state.cache, last_token=last, position=position,
                                                 max_tokens=budget - 1, sampling=config.sampling, generator=generator,
                                                 history=history))
            draft = within_contract(draft, budget - 1, state.cache, position, drafter, config.sampling.greedy)
            recorder.draft_seconds += clock() - t0
        t0 = clock()
        accepted, next_token = verify(model, state.cache, history[-1], draft, position, config.sampling, generator,
                                      observe_logits)
        n_accepted = len(accepted)
        recorder.verify_seconds += clock() - t0
        drafted = draft.tokens.shape[0]
        if session is not None:
            session.observe(drafted, n_accepted)
        recorder.record_step(drafted, n_accepted, draft.forwards, nodes_per_depth(draft))
        committed = len(history)
        for token in accepted + [next_token]:
            history.append(token)
            if token in eos:
                break
        position += 1 + n_accepted
        going = on_tokens is None or on_tokens(tuple(history[committed:])) is not False
    tokens = tuple(history[state.prompt_length:])
    finish = "eos" if tokens[-1] in eos else "stopped" if not going and len(history) < end else "length"
    stats = recorder.finish(new_tokens=len(tokens), total_seconds=state.seconds + clock() - start)
    return GenerationResult(token_ids=tokens, stats=stats, finish_reason=finish, embedding=state.embedding)


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
