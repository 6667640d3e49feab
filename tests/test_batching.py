"""Batched speculative decoding (`knnssd.engine.decoding.step` over many generations, `knnssd.engine.batch`):
each request's greedy output is its plain decoding alone, token for token, whatever it is batched with; requests
join and leave between steps; sampled requests keep the target distribution; the token budget shrinks drafts as
the batch grows.

The packed pass is observed with a spy on `knnssd.engine.decoding.packed_hidden` (the real function runs; the spy
only counts its rows), so a test cannot pass by falling back to one pass per request.
"""

from __future__ import annotations

import random

import pytest
import torch

import knnssd.engine.decoding as decoding
from knnssd.engine.budget import PassCosts, allocate, batch_caps, time_pass_costs
from knnssd.engine.decoding import Generation, GenerationConfig, begin, generate, step
from knnssd.engine.drafters import (LayerSkipConfig, LayerSkipDrafter, PromptLookupConfig, PromptLookupDrafter,
                                    SuffixTreeConfig, SuffixTreeDrafter)
from knnssd.engine.kernels import accelerate
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.skipset import SkipSet
from knnssd.errors import KnnSsdError
from tests.conftest import tiny_model
from tests.test_sampling import SAMPLING, VOCAB, chi_square_p, exact_distribution

BATCHABLE = ("llama", "qwen2")  # Mistral's sliding-window layers keep one pass per request


@pytest.fixture
def packed_rows(monkeypatch):
    """The rows of every packed pass the loop runs (a spy around the real function)."""
    rows: list[int] = []
    real = decoding.packed_hidden

    def spy(model, caches, input_ids, positions, masks):
        rows.append(sum(ids.shape[0] for ids in input_ids))
        return real(model, caches, input_ids, positions, masks)

    monkeypatch.setattr(decoding, "packed_hidden", spy)
    return rows


def drafters():
    return [None, PromptLookupDrafter(PromptLookupConfig(max_ngram=2, max_draft_tokens=10)),
            LayerSkipDrafter(SkipSet.of(attn=[1], mlp=[2]), LayerSkipConfig(threshold=0.0, max_draft_tokens=6)),
            SuffixTreeDrafter(SuffixTreeConfig(max_ngram=3, max_depth=8, max_tree_nodes=15))]


def prompts(count: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of 6-40 tokens from a small alphabet, so that lookups find matches and trees branch."""
    rng = random.Random(seed)
    return [torch.tensor([[rng.randrange(3, 12) for _ in range(rng.randrange(6, 40))]]) for _ in range(count)]


def start(model, prompt, config, drafter):
    started = begin(model, prompt, config)
    return Generation(model, started.state, config, drafter, started.generator, started.clock)


@pytest.mark.parametrize("family", BATCHABLE)
def test_a_batch_with_joins_and_leaves_equals_plain_decoding_alone(family, packed_rows):
    """Sixteen requests (plain, prompt lookup, layer skip, suffix trees), up to eight at a time, admitted between
    steps with different lengths, so requests join and leave while others run; passes of more than 32 rows
    included."""
    model = tiny_model(family, num_layers=3, vocab_size=160)
    accelerate(model)
    requests = [(p, drafters()[i % 4], GenerationConfig(max_new_tokens=12 + 5 * (i % 5), eos_token_ids=()))
                for i, p in enumerate(prompts(16, 160))]
    alone = [generate(model, p, config).token_ids for p, _, config in requests]
    waiting, running, done = list(requests), [], []
    while waiting or running:
        while waiting and len(running) < 8:  # join between steps
            p, drafter, config = waiting.pop(0)
            running.append((len(done) + len(running), start(model, p, config, drafter)))
        step(model, [g for _, g in running])
        done += [(i, g) for i, g in running if g.done]
        running = [(i, g) for i, g in running if not g.done]
    batched = {i: g.result().token_ids for i, g in done}
    order = sorted(batched)
    assert [batched[i] for i in order] == alone
    assert packed_rows and max(packed_rows) > 32, packed_rows
    assert any(g.result().stats.tree_steps for _, g in done)


def test_a_batch_with_budget_caps_stays_identical(packed_rows):
    """Caps from the token budget (here random, 0-5 per request and step) change the drafts, never the output."""
    model = tiny_model("llama", num_layers=3, vocab_size=160)
    accelerate(model)
    rng = random.Random(3)
    config = GenerationConfig(max_new_tokens=30, eos_token_ids=())
    cases = [(p, drafters()[1 + i % 3]) for i, p in enumerate(prompts(5, 160, seed=1))]
    alone = [generate(model, p, config).token_ids for p, _ in cases]
    generations = [start(model, p, config, drafter) for p, drafter in cases]
    while not all(g.done for g in generations):
        step(model, generations, [rng.randrange(0, 6) for _ in generations])
    assert [g.result().token_ids for g in generations] == alone and packed_rows


def test_a_seeded_sampled_request_answers_as_alone_beside_greedy_ones(packed_rows):
    """The budget leaves a seeded sampled request its own draft length (`batch_caps`), so its seed gives its
    answer alone, while the greedy requests beside it are budgeted."""
    model = tiny_model("llama", num_layers=3, vocab_size=160)
    accelerate(model)
    sampled = GenerationConfig(max_new_tokens=24, eos_token_ids=(),
                               sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=11))
    greedy = GenerationConfig(max_new_tokens=24, eos_token_ids=())
    cases = prompts(4, 160, seed=2)
    lookup = PromptLookupDrafter(PromptLookupConfig(max_ngram=2, max_draft_tokens=6))
    expected = [generate(model, cases[0], sampled, lookup).token_ids] + \
        [generate(model, p, greedy).token_ids for p in cases[1:]]
    generations = [start(model, cases[0], sampled, lookup)] + [start(model, p, greedy, lookup) for p in cases[1:]]
    costs = PassCosts(widths=(1, 4, 64), seconds=(1.0, 1.05, 8.0))  # rows cheap at first, then dear
    budgeted = 0
    while not all(g.done for g in generations):
        live = [g for g in generations if not g.done]
        caps = batch_caps(live, costs)
        if caps is not None and not generations[0].done:
            assert caps[0] is None and all(cap is not None for cap in caps[1:]), caps
            budgeted += 1
        step(model, live, caps)
    assert budgeted
    assert [g.result().token_ids for g in generations] == expected and packed_rows


def test_batched_sampling_follows_the_target_distribution(packed_rows):
    """1,500 sampled generations of 3 tokens, run 8 at a time in packed passes with random draft caps (0-3) and
    prompt lookup: the joint of tokens 1-2 and the marginal of token 3 match the exact target distribution
    (chi-square, as tests/test_sampling.py)."""
    model = tiny_model("llama", seed=7, num_layers=2, vocab_size=VOCAB, initializer_range=0.5)
    prompt = torch.tensor([[1, 1, 3, 5, 5, 5]])
    exact = exact_distribution(model, prompt, 3)
    drafter = PromptLookupDrafter(PromptLookupConfig(max_ngram=2, max_draft_tokens=4))
    rng = random.Random(5)
    samples = []
    for batch in range(1500 // 8 + 1):
        generations = []
        for i in range(8):
            config = GenerationConfig(max_new_tokens=3, eos_token_ids=(), sampling=SamplingConfig(
                temperature=SAMPLING.temperature, top_p=SAMPLING.top_p, seed=SAMPLING.seed + 8 * batch + i))
            generations.append(start(model, prompt, config, drafter))
        while not all(g.done for g in generations):
            step(model, generations, [rng.randrange(0, 4) for _ in generations])
        samples += [g.result().token_ids for g in generations]
    samples = samples[:1500]
    pair, third = {}, {}
    for seq, p in exact.items():
        pair[seq[:2]] = pair.get(seq[:2], 0.0) + p
        third[seq[2:]] = third.get(seq[2:], 0.0) + p
    assert chi_square_p([s[:2] for s in samples], pair) > 1e-3
    assert chi_square_p([s[2:] for s in samples], third) > 1e-3
    assert packed_rows


def test_mistral_sliding_windows_keep_one_pass_per_request(packed_rows):
    model = tiny_model("mistral", num_layers=3, vocab_size=160)
    accelerate(model)
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=())
    cases = prompts(3, 160, seed=4)
    alone = [generate(model, p, config, drafters()[1]).token_ids for p in cases]
    generations = [start(model, p, config, drafters()[1]) for p in cases]
    while not all(g.done for g in generations):
        step(model, generations)
    assert [g.result().token_ids for g in generations] == alone
    sliding = any(getattr(layer, "is_sliding", False) for layer in generations[0].cache.layers)
    assert sliding and packed_rows == []


def test_the_budget_shrinks_speculation_as_the_batch_grows():
    """With a pass cost nearly flat up to 8 rows and linear beyond (a memory-bound machine turning compute-bound),
    one request drafts several tokens, and the draft tokens per request fall to 0 as the batch grows."""
    costs = PassCosts(widths=(1, 8, 64), seconds=(1.0, 1.2, 6.0))
    per_request = []
    for batch in (1, 2, 4, 8, 16):
        caps = allocate([0.7] * batch, [15] * batch, costs)
        per_request.append(sum(caps) / batch)
    assert per_request[0] >= 3 and per_request[-1] == 0
    assert all(a >= b for a, b in zip(per_request, per_request[1:])), per_request
    # requests more likely to accept get the rows first; a request that does not draft gets none
    caps = allocate([0.9, 0.2, 0.6, 0.9], [15, 15, 15, 0], costs)
    assert caps[0] >= caps[2] >= caps[1] and caps[3] == 0


def test_pass_costs_are_checked_and_timed():
    with pytest.raises(KnnSsdError, match="increasing widths"):
        PassCosts(widths=(4, 2), seconds=(1.0, 2.0))
    table = PassCosts(widths=(1, 8, 64), seconds=(1.0, 1.2, 6.0))
    assert table.of(4) == pytest.approx(1.0 + 0.2 * 3 / 7)  # between widths: linear
    assert table.of(128) == pytest.approx(6.0 + 4.8 * 64 / 56)  # past the last: along the last slope
    model = tiny_model("llama", num_layers=2, vocab_size=64)
    accelerate(model)
    costs = time_pass_costs(model, widths=(1, 4, 40), context=16, repeats=1)
    assert costs.widths == (1, 4, 40) and all(s > 0 for s in costs.seconds)
    assert list(costs.seconds) == sorted(costs.seconds)  # a wider pass never priced below a narrower one


def test_a_request_wider_than_one_pass_and_eos_inside_accepted_drafts(packed_rows):
    """A request whose drafts make it wider than 32 rows is verified on its own pass (as alone: F.linear past 32
    rows), the others packed; an EOS inside a request's accepted drafts ends that request in the batch as alone."""
    model = tiny_model("llama", num_layers=3, vocab_size=160)
    accelerate(model)
    wide = PromptLookupDrafter(PromptLookupConfig(max_ngram=2, max_draft_tokens=40))
    span = torch.arange(3, 43)
    cases = [torch.cat([span, span])[None], *prompts(3, 160, seed=6)]
    plain_config = GenerationConfig(max_new_tokens=40, eos_token_ids=())
    alone = [generate(model, p, plain_config).token_ids for p in cases]
    eos = alone[1][5]  # a token request 1 writes: its answer ends there, inside whatever drafts it accepted
    configs = [plain_config, GenerationConfig(max_new_tokens=40, eos_token_ids=(eos,)), plain_config, plain_config]
    expected = [generate(model, p, c, d).token_ids for p, c, d in zip(cases, configs, [wide] + drafters()[1:4])]
    generations = [start(model, p, c, d) for p, c, d in zip(cases, configs, [wide] + drafters()[1:4])]
    while not all(g.done for g in generations):
        step(model, [g for g in generations if not g.done])
    assert [g.result().token_ids for g in generations] == expected
    assert expected[1][-1] == eos and generations[1].result().finish_reason == "eos"
    assert len(generations[0].recorder.verify_widths) > 32  # request 0 drafted 32+ tokens: a pass of 33+ rows
    assert packed_rows and max(packed_rows) <= 32 * 3


def test_dynamic_rope_is_not_packed():
    """A rotary embedding whose frequencies follow the longest position of the input (dynamic scaling) would let
    one request's position change another's angles: such a model keeps one pass per request."""
    from knnssd.engine.batch import can_batch
    from knnssd.engine.kvcache import new_cache

    plain = tiny_model("llama", num_layers=2, vocab_size=64)
    scaled = tiny_model("llama", num_layers=2, vocab_size=64,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert can_batch(plain, [new_cache(plain)], 4)
    assert not can_batch(scaled, [new_cache(scaled)], 4)
