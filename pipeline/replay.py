"""Replaying a drafter over plain decoding's own output: a trial's counted events without decoding it.

Under greedy decoding every drafter commits exactly plain decoding's tokens, so what a policy would do on a
prompt is fixed by that prompt's greedy continuation:

- prompt lookup drafts from the committed tokens alone, so replaying the real `PromptLookupSession` over the
  continuation gives exactly the drafts, acceptances and verify widths of a real run;
- a layer-skip draft's first token, after committed position p, is the skipping model's prediction from token p
  with the full model's cache for positions < p. One parallel pass of the skipping model over the whole
  continuation, each query seeing the full model's keys and values before it and its own at its position (a
  4-D attention mask), gives that prediction and its confidence at every position at once: exact for the first
  drafted token, up to rounding (the pass multiplies many rows at once where the real draft runs 1-token
  forwards, so an argmax near-tie or a confidence right at the threshold can come out the other way).
  Where replay departs from the real loop after that:
  * while the draft is right, a later drafted token is read at its own position in the same pass, so the
    drafted positions before it hold the full model's keys and values where the real draft holds the skipping
    model's own: its token and confidence are approximations, and so is the number of tokens accepted;
  * after the first wrong drafted token the two part ways entirely: the real drafter feeds its own wrong token
    and keeps drafting from it, while replay reads predictions made from the true continuation. Every drafted
    token after the first wrong one, its confidence, and so where the draft stops (the drafted count, hence the
    verify width) and the number of draft forwards are those of another text. The step's accepted count is
    not affected (acceptance ends at the first wrong token), but its price is, and with an `adaptive`
    threshold, which moves with each step's drafted and accepted counts, so is every later step;
  * the prediction ends at the trace's last token: where plain decoding stopped at EOS before its budget, a
    real draft may run past that position, and replay's draft stops there.
  `tests/test_replay.py` bounds the error against the real loop, and `benchmarks/replay_check.py` measures it
  (accepted tokens, verify steps, drafted tokens and draft forwards) on Spec-Bench.
- a hybrid replays the real lookup session and the layer-skip replay, as `HybridSession` combines them;
- a suffix tree, like prompt lookup, drafts from the committed tokens (and its stores: own, union, or with
  store_scope "both" the better candidate of the two, chosen from the text and the stores alone) alone: replaying
  the real `SuffixTreeSession` gives exactly the real run's trees. With recycled successors its table also learns from
  each verify pass's committed rows (`observe_logits`); replay hands the session the same rows' top successors
  from the trace (`Trace.successors`, recorded by `pipeline.traces.with_successors` on an untimed plain run), so
  the tables, hence the trees, are the real run's too (rows of rejected drafts never reach the table, in either).

`replay` mirrors the decoding loop (`knnssd.engine.decoding.decode`): the same budget, the same draft cut
(`knnssd.engine.decoding.within_contract`: a path cut to the budget, a tree to that depth), acceptance as the loop's
(a path: the longest prefix that matches the continuation; a tree: `knnssd.engine.tree.accept_greedy`'s rule, the
deepest node whose whole path matches, the first in node order among equals), the bonus token, EOS. Its output
is the counted events (`Replayed`), which `pipeline.costs.StepCosts` prices. One departure for every kind: where
plain decoding stopped at EOS, the target's choice after the EOS is not in the trace, so replay accepts no draft
token past it while a real verify pass could (the loop then commits nothing past the EOS either, but counts those
tokens accepted).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.decoding import GenerationConfig
from knnssd.engine.drafters import (Draft, DraftRequest, Drafter, HybridDrafter, HybridSession, LayerSkipConfig,
                             LayerSkipDrafter, PromptLookupDrafter, SuffixTreeDrafter)
from knnssd.engine.drafters.layer_skip import confident_enough
from knnssd.errors import KnnSsdError
from knnssd.engine.kernels import transformers_kernels
from knnssd.engine.kvcache import rollback
from knnssd.engine.skipset import SkipSet
from knnssd.engine.stats import StatsRecorder, Tally
from knnssd.engine.sublayers import decoder_layers, model_lock, skip_sublayers
from knnssd.engine.tree import accept_targets, depths, nodes_per_depth, within_depth
from pipeline.traces import Trace, trace_of, trace_prompt, with_successors  # noqa: F401 - where callers import them from


@dataclass(frozen=True)
class Prediction:
    """The skipping model's greedy choice after each committed token of a trace.

    tokens[i], confidence[i]: its argmax and top-1 probability from trace token i (at position
    len(prompt) + i), predicting token i + 1; one entry per token but the last.
    """

    tokens: tuple[int, ...]
    confidence: tuple[float, ...]


@dataclass(frozen=True)
class Step:
    """One verification step: `drafted` tokens checked (a tree's nodes), `accepted` of them kept, after
    `forwards` draft passes; `by_depth`: a tree's nodes per depth (`knnssd.engine.tree.nodes_per_depth`), None for a
    path."""

    drafted: int
    accepted: int
    forwards: int
    by_depth: tuple[int, ...] | None = None

    @property
    def width(self) -> int:
        """Tokens in the verify pass: the last committed token and every drafted token (or tree node)."""
        return self.drafted + 1


@dataclass(frozen=True)
class Replayed:
    """The events of one replayed generation, in order."""

    steps: tuple[Step, ...]

    @property
    def tally(self) -> Tally:
        return Tally(accepted=sum(s.accepted for s in self.steps), drafted=sum(s.drafted for s in self.steps),
                     steps=len(self.steps))

    def recorded(self) -> StatsRecorder:
        """The steps recorded as the decoding loop records them (verify widths, tree steps, drafts and acceptance
        by position, draft forwards), to compare with a real run's `GenerationStats`."""
        recorder = StatsRecorder()
        for step in self.steps:
            recorder.record_step(step.drafted, step.accepted, step.forwards,
                                 None if step.by_depth is None else list(step.by_depth))
        return recorder


def sliding_window(model: PreTrainedModel) -> int | None:
    """The attention window every layer uses (None: full attention); mixed layers are refused."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        raise KnnSsdError("this model mixes full and sliding-window attention layers, which replay does not model",
                          fix="calibrate it with wall-clock trials (a model with one attention kind replays)")
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def full_cache(model: PreTrainedModel, trace: Trace) -> DynamicCache:
    """The full model's keys and values over the prompt and every new token but the last: (prompt + n - 1)
    positions, in a plain cache (full layers, whatever the model's window, so any position can be read)."""
    ids = torch.tensor([list(trace.prompt) + list(trace.tokens[:-1])], device=model.device)
    cache = DynamicCache()
    with torch.inference_mode(), model_lock(model), transformers_kernels(model):
        model.model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device).unsqueeze(0),
                    cache=cache, use_cache=True)
    return cache


def replay_mask(prompt_length: int, queries: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(1, 1, queries, cached + queries) bool mask, cached = prompt_length + queries: query i, at position
    p = prompt_length + i, sees the cached keys of positions < p (within `window`) and its own new key only."""
    cached = prompt_length + queries
    position = torch.arange(prompt_length, cached, device=device).unsqueeze(1)  # (queries, 1)
    key = torch.arange(cached, device=device).unsqueeze(0)  # (1, cached)
    past = key < position
    if window is not None:
        past &= position - key < window
    own = torch.eye(queries, dtype=torch.bool, device=device)
    return torch.cat([past, own], dim=1)[None, None]


def predict(model: PreTrainedModel, trace: Trace, cache: DynamicCache, skip_set: SkipSet,
            inputs: list[torch.Tensor] | None = None) -> Prediction:
    """One parallel pass of the model skipping `skip_set` over the trace (see the module docstring); `cache` is
    `full_cache(model, trace)` and is left as it was.

    `inputs` (optional, read and extended in place): this trace's layer inputs with nothing skipped, inputs[L]
    (1, queries, hidden) the hidden states entering decoder layer L in this very pass. The decoder layers before
    the first one `skip_set` touches compute what they compute with nothing skipped, so the pass starts at the
    deepest captured layer up to that one, from its captured input (`layers_from`): the same layers see the same
    tensors, mask, positions and cache as in the whole pass, so the prediction is bit for bit the whole pass's.
    The pass captures the inputs of the layers it runs up to that first skipped one. Memory: 4 x layers x
    queries x hidden bytes per trace at most (fp32)."""
    return predict_all(model, [(trace, cache, inputs)], skip_set)[0]


@torch.inference_mode()
def predict_all(model: PreTrainedModel, prompts: Sequence[tuple[Trace, DynamicCache, list[torch.Tensor] | None]],
                skip_set: SkipSet) -> list[Prediction]:
    """`predict(model, trace, cache, skip_set, inputs)` of each (trace, cache, inputs) of `prompts`, the model
    set up for `skip_set` once for all of them (entering the kernels' and skipping blocks walks every module)."""
    with model_lock(model), skip_sublayers(model, skip_set), transformers_kernels(model):
        return [skipping_pass(model, trace, cache, skip_set, inputs) for trace, cache, inputs in prompts]


def skipping_pass(model: PreTrainedModel, trace: Trace, cache: DynamicCache, skip_set: SkipSet,
                  inputs: list[torch.Tensor] | None) -> Prediction:
    """`predict`'s pass, inside its blocks (the model already skipping `skip_set`, transformers' kernels)."""
    queries = len(trace.tokens) - 1
    if queries < 1:
        return Prediction(tokens=(), confidence=())
    cached = cache.get_seq_length()
    device = model.device
    ids = torch.tensor([list(trace.tokens[:-1])], device=device)  # (1, queries)
    positions = torch.arange(len(trace.prompt), len(trace.prompt) + queries, device=device).unsqueeze(0)
    mask = replay_mask(len(trace.prompt), queries, sliding_window(model), device)
    layers = decoder_layers(model)
    if getattr(model.config, "model_type", None) not in LATE_START_FAMILIES:
        inputs = None  # the whole pass, nothing kept
    first = min(skip_set.attn + skip_set.mlp, default=len(layers))  # layers < first: nothing skipped
    start = min(first, len(inputs) - 1) if inputs else 0
    feed = {"input_ids": ids} if start == 0 else {"inputs_embeds": inputs[start]}
    try:
        with layers_from(model, start), capturing_inputs(layers, first, inputs):
            hidden = model.model(**feed, position_ids=positions, attention_mask=mask, cache=cache,
                                 use_cache=True).last_hidden_state[0]  # (queries, hidden)
            logits = model.get_output_embeddings()(hidden)  # (queries, vocab)
    finally:
        rollback(cache, cached)
    confidence, tokens = logits.float().softmax(dim=-1).max(dim=-1)
    return Prediction(tokens=tuple(tokens.tolist()), confidence=tuple(confidence.tolist()))


# Families whose pass may start at a later layer (`layers_from`): their forward feeds `inputs_embeds` unscaled and
# runs each layer on the mask it is given. Qwen2 picks a layer's mask by its index in the (sliced) list, which is
# harmless here only because replay passes one 4-D mask tensor for every layer type; a family that scales its
# embeddings (Gemma) or keys per-layer settings by index otherwise replays the whole pass.
LATE_START_FAMILIES = ("llama", "qwen2", "mistral")


@contextmanager
def layers_from(model: PreTrainedModel, start: int) -> Iterator[None]:
    """Within the block the model's forward runs decoder layers start.. only (each keeps its own layer_idx, so
    it reads and writes its own cache layer); its input is then layer `start`'s (`inputs_embeds`)."""
    if start == 0:
        yield
        return
    base = model.model
    layers = base.layers
    base.layers = layers[start:]
    try:
        yield
    finally:
        base.layers = layers


@contextmanager
def capturing_inputs(layers: torch.nn.ModuleList, first: int, inputs: list[torch.Tensor] | None) -> Iterator[None]:
    """Within the block a forward appends to `inputs` the input hidden states of layers len(inputs)..`first`
    (those not captured yet, up to the first layer whose sub-layers are skipped); nothing when `inputs` is None."""
    if inputs is None:
        yield
        return
    wanted = range(len(inputs), min(first, len(layers) - 1) + 1)

    def capture(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if len(inputs) == index:  # layers run in order: index is the next one missing
                inputs.append(args[0])
        return hook

    handles = [layers[index].register_forward_pre_hook(capture(index)) for index in wanted]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ReplayedLayerSkip:
    """A layer-skip session that reads its drafts from a `Prediction` instead of running the model; the stop
    rule is the real session's (`knnssd.engine.drafters.layer_skip.confident_enough`), the threshold adapts as there."""

    def __init__(self, config: LayerSkipConfig, prediction: Prediction, prompt_length: int) -> None:
        self.config = config
        self.prediction = prediction
        self.prompt_length = prompt_length
        self.threshold = config.threshold

    def propose(self, request: DraftRequest) -> Draft:
        limit = min(self.config.max_draft_tokens, request.max_tokens)
        start = request.position - self.prompt_length
        tokens: list[int] = []
        forwards = 0
        for index in range(start, min(start + limit, len(self.prediction.tokens))):
            forwards += 1
            take, stop = confident_enough(self.prediction.confidence[index], self.threshold, self.config)
            if take:
                tokens.append(self.prediction.tokens[index])
            if stop:
                break
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), probs=None, forwards=forwards)

    def observe(self, drafted: int, accepted: int) -> None:
        self.threshold = self.config.adapted_threshold(self.threshold, drafted, accepted)


def replay_session(drafter: Drafter, prediction: Prediction | None, prompt_length: int):
    """The session that replays `drafter`: the real one for lookup and suffix trees, a `ReplayedLayerSkip` for
    layer skipping."""
    if isinstance(drafter, (PromptLookupDrafter, SuffixTreeDrafter)):
        return drafter.start()
    if prediction is None:
        raise ValueError("a layer-skip replay needs the skipping model's prediction")
    if isinstance(drafter, LayerSkipDrafter):
        return ReplayedLayerSkip(drafter.config, prediction, prompt_length)
    if isinstance(drafter, HybridDrafter):
        return HybridSession(drafter.lookup.start(),
                             ReplayedLayerSkip(drafter.layer_skip.config, prediction, prompt_length))
    raise KnnSsdError(f"drafter {type(drafter).__name__} cannot be replayed",
                      fix="replay the built-in drafters (layer_skip, prompt_lookup, hybrid, suffix_tree)")


def within_budget(draft: Draft, max_tokens: int) -> Draft:
    """The draft as `knnssd.engine.decoding.within_contract` cuts it under greedy decoding: a tree to depth
    `max_tokens` (a path when what is left is one), a path to `max_tokens` tokens."""
    return within_depth(draft, max_tokens) if draft.parents is not None else Draft(
        tokens=draft.tokens[:max_tokens], probs=None, forwards=draft.forwards)


def accepted_nodes(draft: Draft, following: tuple[int, ...]) -> int:
    """How many draft tokens the loop accepts when the target's greedy choices are `following` (the
    continuation after the last committed token): a path's longest matching prefix; a tree's accepted path by
    `knnssd.engine.tree.accept_greedy` itself. The target after a node is `following[depth]` when the node's path
    matches (else it is never read); beyond `following`'s end it is unknown (None) and matches no token."""
    tokens = draft.tokens.tolist()
    if draft.parents is None:
        return next((i for i, (token, expected) in enumerate(zip(tokens, following)) if token != expected),
                    min(len(tokens), len(following)))
    parents = draft.parents.tolist()
    targets = [following[0] if following else None]  # row 0: after the root; row 1 + i: after node i
    targets += [following[d] if d < len(following) else None for d in depths(parents)]
    path, _ = accept_targets(tokens, parents, targets)
    return len(path)



def observe_rows(session, trace: Trace, committed: int, accepted: int) -> None:
    """What a verify pass hands a recycling session (`observe_logits`): the committed rows, new tokens
    committed - 1 .. committed - 1 + accepted, here from the trace's recorded successors (a row past them, after
    an EOS, ends the generation anyway)."""
    if getattr(session, "successors", None) is None:
        return
    if trace.successors is None:
        raise KnnSsdError("this policy drafts recycled successors, which replay reads from the trace's recorded "
                          "successors, but the trace has none",
                          fix="trace the prompt with pipeline.traces.trace_prompt, or add them to a trace with "
                          "pipeline.traces.with_successors")
    rows = range(committed - 1, min(committed + accepted, len(trace.successors)))
    session.observe_successors([trace.tokens[j] for j in rows], [trace.successors[j] for j in rows])


def replay(drafter: Drafter, trace: Trace, prediction: Prediction | None = None) -> Replayed:
    """The events `knnssd.engine.decoding.decode` would record decoding the trace's prompt greedily with `drafter`."""
    session = replay_session(drafter, prediction, len(trace.prompt))
    continuation = trace.tokens
    history = list(trace.prompt) + [continuation[0]]
    committed = 1  # new tokens committed; continuation[committed - 1] is the last
    steps = []
    no_device = torch.empty((1, 1), dtype=torch.long)
    while committed < len(continuation):
        budget = trace.max_new_tokens - committed
        drafted: list[int] = []
        forwards = 0
        if budget > 1:
            draft = session.propose(DraftRequest(model=None, cache=None, last_token=no_device,  # type: ignore[arg-type]
                                                 position=len(history) - 1, max_tokens=budget - 1,
                                                 sampling=GenerationConfig().sampling, generator=None,
                                                 history=history))
            draft = within_budget(draft, budget - 1)
            drafted, forwards, by_depth = draft.tokens.tolist(), draft.forwards, nodes_per_depth(draft)
            accepted = accepted_nodes(draft, continuation[committed:])
        else:
            accepted, by_depth = 0, None
        observe_rows(session, trace, committed, accepted)
        session.observe(len(drafted), accepted)
        steps.append(Step(drafted=len(drafted), accepted=accepted, forwards=forwards,
                          by_depth=None if by_depth is None else tuple(by_depth)))
        take = min(accepted + 1, len(continuation) - committed)
        history.extend(continuation[committed:committed + take])
        committed += take
    return Replayed(steps=tuple(steps))
