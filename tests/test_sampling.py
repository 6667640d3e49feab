"""Sampling is lossless: speculative rejection sampling reproduces the target distribution."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import (DraftRequest, HybridDrafter, LayerSkipConfig, LayerSkipDrafter, PromptLookupConfig,
                             PromptLookupDrafter, SuffixTreeConfig, SuffixTreeDrafter)
from knnssd.errors import KnnSsdError
from knnssd.engine.sublayers import skip_sublayers
from knnssd.engine.sampling import SamplingConfig, verify_sampling, warp_probs
from knnssd.engine.skipset import SkipSet
from tests.conftest import tiny_model

VOCAB = 6
SAMPLING = SamplingConfig(temperature=1.0, top_p=0.95, top_k=0, seed=1234)
SKIP = SkipSet.of(attn=[0, 1], mlp=[1])


@pytest.fixture(scope="module")
def model():
    # large init so that the distributions are far from uniform and the draft differs from the target
    return tiny_model("llama", seed=7, num_layers=2, vocab_size=VOCAB, initializer_range=0.5)


@torch.inference_mode()
def exact_distribution(model, prompt, length):
    """Exact P(first `length` new tokens) under the warped target: {token tuple: probability}."""
    dist = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, p in dist.items():
            ids = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long).reshape(1, -1)], dim=1)
            probs = warp_probs(model(input_ids=ids).logits[0, -1], SAMPLING)
            for token in range(VOCAB):
                if probs[token] > 0:
                    nxt[prefix + (token,)] = p * float(probs[token])
        dist = nxt
    return dist


def chi_square_p(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    """Pearson chi-square p-value; cells with expected count < 5 are pooled into one.
    A sample outside the support of `exact` is impossible under it: p-value 0."""
    n = len(samples)
    counts = Counter(samples)
    if any(cell not in exact for cell in counts):
        return 0.0
    observed, expected, pooled_o, pooled_e = [], [], 0.0, 0.0
    for cell, p in exact.items():
        if p * n >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(p * n)
        else:
            pooled_o += counts.get(cell, 0)
            pooled_e += p * n
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    expected = np.array(expected) * (sum(observed) / sum(expected))
    return float(chisquare(observed, expected).pvalue)


def draw(model, prompt, drafter, n, length=3):
    samples = []
    for i in range(n):
        config = GenerationConfig(max_new_tokens=length, eos_token_ids=(),
                                  sampling=SamplingConfig(temperature=SAMPLING.temperature, top_p=SAMPLING.top_p,
                                                          seed=SAMPLING.seed + i))
        samples.append(generate(model, prompt, config, drafter).token_ids)
    return samples


LAYER_SKIP = LayerSkipDrafter(SKIP, LayerSkipConfig(threshold=0.0, max_draft_tokens=4))
DRAFTERS = {
    "layer_skip": LAYER_SKIP,
    "prompt_lookup": PromptLookupDrafter(PromptLookupConfig(max_ngram=2, max_draft_tokens=4)),
    # on the test prompt 2-grams match in about 1 generation in 10, so both sources draft
    "hybrid": HybridDrafter(PromptLookupDrafter(PromptLookupConfig(max_ngram=2, min_ngram=2)), LAYER_SKIP),
    # a token tree under greedy decoding (see the test below); under sampling the loop verifies its first path
    "suffix_tree": SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=4)),
}


def test_the_suffix_tree_drafts_a_tree_on_the_test_prompt():
    """After the test prompt and a first token 1, the unigram "1" occurred twice, followed by 1 and by 3: a tree,
    which the sampling test above then sees reduced to its first path."""
    history = [1, 1, 3, 5, 5, 5, 1]
    request = DraftRequest(model=None, cache=None, last_token=torch.tensor([[1]]), position=6, max_tokens=2,
                           sampling=SAMPLING, generator=None, history=history)
    draft = DRAFTERS["suffix_tree"].start().propose(request)
    assert draft.parents is not None and sorted(draft.tokens.tolist()[:2]) == [1, 3]


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_first_tokens_follow_the_target_distribution(model, name):
    """Joint of tokens 1-2 and marginal of token 3: token 1 comes from the prefill, tokens 2-3 from the
    first verification of a draft (layer-skip drafting forced with threshold 0; the first new token occurs
    in the prompt in 98% of draws, so prompt lookup drafts almost always)."""
    prompt = torch.tensor([[1, 1, 3, 5, 5, 5]])
    exact = exact_distribution(model, prompt, 3)
    drafter = DRAFTERS[name]
    samples = draw(model, prompt, drafter, n=1500)
    pair = {}
    third = {}
    for seq, p in exact.items():
        pair[seq[:2]] = pair.get(seq[:2], 0.0) + p
        third[seq[2:]] = third.get(seq[2:], 0.0) + p
    assert chi_square_p([s[:2] for s in samples], pair) > 1e-3
    assert chi_square_p([s[2:] for s in samples], third) > 1e-3


def test_the_test_detects_the_draft_distribution(model):
    """Control: samples from the skipping model alone (no verification) fail the same test."""
    prompt = torch.tensor([[1, 3, 4, 5, 3]])
    exact = exact_distribution(model, prompt, 2)
    with skip_sublayers(model, SKIP):
        samples = draw(model, prompt, None, n=1500, length=2)
    assert chi_square_p(samples, exact) < 1e-6


def test_rejection_sampling_of_deterministic_drafts_is_exact():
    """A draft proposed without a distribution (prompt lookup, q = point mass): P(next token) == p."""
    generator = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]])
    counts = Counter()
    for i in range(20000):
        draft = torch.tensor([i % 4])  # any proposal rule that ignores the sampled outcome
        n_accepted, token = verify_sampling(draft, None, p, generator)
        counts[int(draft) if n_accepted else token] += 1
    observed = [counts[t] for t in range(3)]
    assert chisquare(observed, [20000 * float(x) for x in p[0, :3]]).pvalue > 1e-3
    assert counts[3] == 0


def test_rejection_sampling_step_is_exact():
    """One verification step, by enumeration: P(next emitted token) == p for arbitrary p, q."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.6]])
    counts = Counter()
    for _ in range(20000):
        draft = torch.multinomial(q[0], 1, generator=generator)
        n_accepted, token = verify_sampling(draft, q, p, generator)
        counts[int(draft) if n_accepted else token] += 1
    observed = [counts[t] for t in range(3)]
    assert chisquare(observed, [20000 * float(x) for x in p[0, :3]]).pvalue > 1e-3
    assert counts[3] == 0


def test_warping_matches_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    config = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8)
    scores = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    assert torch.allclose(warp_probs(logits, config), scores.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k")])
def test_bad_sampling_settings(kwargs, words):
    with pytest.raises(KnnSsdError, match=words):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("draft_probs", [None, "q"])
def test_a_token_the_target_gives_zero_probability_is_never_accepted(monkeypatch, draft_probs):
    """u is drawn from [0, 1): at u == 0 exactly, "accept iff u * q <= p" would accept a draft with p(x) = 0.
    u == 0 cannot be produced on purpose, so torch.rand is replaced by zeros for this one call."""
    import knnssd.engine.sampling as sampling

    monkeypatch.setattr(sampling.torch, "rand", lambda *args, **kwargs: torch.zeros(args[0]))
    target = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.4, 0.4]])  # p(token 0) = 0 at the first position
    q = torch.tensor([[1.0, 0.0, 0.0]]) if draft_probs else None
    n_accepted, token = verify_sampling(torch.tensor([0]), q, target, None)
    assert n_accepted == 0 and token != 0
