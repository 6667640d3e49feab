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

from dataclasses import dataclass

import torch

from knnssd.engine.decoding import GenerationConfig
from knnssd.engine.drafters import (Draft, DraftRequest, Drafter, HybridDrafter, HybridSession, LayerSkipConfig,
                             LayerSkipDrafter, PromptLookupDrafter, SuffixTreeDrafter)
from knnssd.engine.drafters.layer_skip import confident_enough
from knnssd.errors import KnnSsdError
from knnssd.engine.stats import StatsRecorder, Tally
from knnssd.engine.tree import accept_targets, depths, nodes_per_depth, within_depth
from pipeline.skipping_pass import (Prediction, full_cache, predict, predict_all,  # noqa: F401 - where callers
                                    replay_mask, sliding_window)  # import them from
from pipeline.traces import Trace, trace_of, trace_prompt, with_successors  # noqa: F401 - where callers import them from


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
