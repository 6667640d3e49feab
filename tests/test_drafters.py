"""Prompt lookup's n-gram index, the hybrid's choice of source, and draft policies as JSON."""

from __future__ import annotations

import pytest
import torch

from knnssd.decoding import GenerationConfig, generate
from knnssd.drafters import LayerSkipConfig, LayerSkipDrafter
from knnssd.errors import KnnSsdError
from knnssd.drafters import HybridDrafter
from knnssd.drafters import NgramIndex, PromptLookupConfig, PromptLookupDrafter
from knnssd.policy import describe_policy, drafter_from_policy, policy_of
from knnssd.skipset import SkipSet
from tests.conftest import tiny_model


def test_lookup_proposes_what_followed_the_longest_latest_match():
    index = NgramIndex(PromptLookupConfig(max_ngram=3, min_ngram=1, max_draft_tokens=4))
    history = [7, 1, 2, 3, 9, 9, 1, 2, 3, 5, 6, 1, 2]
    index.update(history)
    # "1 2" last occurred at positions 6-7 (followed by 3 5 6 1); 3-gram "6 1 2" never occurred before
    assert index.continuation(history, 4) == [3, 5, 6, 1]
    assert index.continuation(history, 2) == [3, 5]
    history += [8]
    index.update(history)  # incremental: only the new n-grams are indexed
    assert index.continuation(history, 4) == []  # 8 never occurred before
    history += [8]
    index.update(history)
    assert index.continuation(history, 4) == [8]  # "8" followed by "8"; the continuation stops at the end


def test_lookup_respects_min_ngram():
    index = NgramIndex(PromptLookupConfig(max_ngram=2, min_ngram=2))
    history = [1, 4, 2, 9, 4]
    index.update(history)
    assert index.continuation(history, 5) == []  # only the unigram "4" matches


@pytest.mark.parametrize("kwargs", [{"min_ngram": 0}, {"max_ngram": 1, "min_ngram": 2}, {"max_draft_tokens": 0}])
def test_bad_lookup_config(kwargs):
    with pytest.raises(KnnSsdError, match="fix:"):
        PromptLookupConfig(**kwargs)


def test_lookup_spends_no_forward_and_drafts_on_repetitive_text():
    model = tiny_model("llama", seed=0)
    prompt = torch.tensor([[5, 6, 7, 8, 9] * 4])
    result = generate(model, prompt, GenerationConfig(max_new_tokens=30, eos_token_ids=()), PromptLookupDrafter())
    assert result.stats.draft_forwards == 0
    assert result.stats.drafted_tokens > 0


def test_hybrid_uses_layer_skip_when_lookup_has_no_match():
    model = tiny_model("llama", seed=0)
    never = PromptLookupDrafter(PromptLookupConfig(max_ngram=8, min_ngram=8))  # no 8-gram repeats here
    hybrid = HybridDrafter(never, LayerSkipDrafter(SkipSet.of(attn=[3]), LayerSkipConfig(threshold=0.0)))
    prompt = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    stats = generate(model, prompt, GenerationConfig(max_new_tokens=12, eos_token_ids=()), hybrid).stats
    assert stats.draft_forwards > 0 and stats.drafted_tokens > 0


@pytest.mark.parametrize("drafter", [
    None,
    LayerSkipDrafter(SkipSet.of(attn=[1], mlp=[2]), LayerSkipConfig(threshold=0.6, max_draft_tokens=5)),
    PromptLookupDrafter(PromptLookupConfig(max_ngram=4, min_ngram=2, max_draft_tokens=7)),
    HybridDrafter(PromptLookupDrafter(), LayerSkipDrafter(SkipSet.of(attn=[3]))),
])
def test_policy_round_trip(drafter):
    policy = policy_of(drafter)
    assert drafter_from_policy(policy, num_layers=4) == drafter
    assert describe_policy(policy)


@pytest.mark.parametrize("policy, words", [
    ({"kind": "beam"}, "unknown draft policy kind"),
    ({"kind": "hybrid", "prompt_lookup": {}}, "needs the objects"),
    ({"kind": "layer_skip", "skip_set": {"attn": [9]}}, "layer"),
    ({"kind": "prompt_lookup", "max_ngram": 0}, "min_ngram"),
])
def test_bad_policies_name_the_problem(policy, words):
    with pytest.raises(KnnSsdError, match=words):
        drafter_from_policy(policy, num_layers=4)


class Greedy:
    """A user's drafter that breaks the loop's contract: it proposes more than it may, or drops cached state."""

    def __init__(self, extra: int = 0, crop_cache: bool = False) -> None:
        self.extra, self.crop_cache = extra, crop_cache

    def start(self):
        return self

    def describe(self):
        return {"kind": "custom"}

    def propose(self, request):
        from knnssd.drafters import Draft

        if self.crop_cache:
            request.cache.crop(-1)
        tokens = torch.full((request.max_tokens + self.extra,), 5, dtype=torch.long)
        return Draft(tokens=tokens, probs=None)

    def observe(self, drafted, accepted):
        pass


def test_a_drafter_that_overshoots_is_cut_to_the_budget():
    model = tiny_model("llama", seed=0)
    prompt = torch.tensor([[5, 6, 7, 8]])
    config = GenerationConfig(max_new_tokens=7, eos_token_ids=())
    result = generate(model, prompt, config, Greedy(extra=20))
    assert len(result.token_ids) == 7
    assert result.token_ids == generate(model, prompt, config).token_ids


def test_a_drafter_that_drops_committed_cache_is_refused():
    model = tiny_model("llama", seed=0)
    with pytest.raises(KnnSsdError, match="fewer than the .* committed"):
        generate(model, torch.tensor([[5, 6, 7, 8]]), GenerationConfig(max_new_tokens=5, eos_token_ids=()),
                 Greedy(crop_cache=True))


@pytest.mark.parametrize("policy, words", [
    ({"kind": "prompt_lookup", "max_ngram": 2.5}, "max_ngram must be an integer"),
    ({"kind": "layer_skip", "skip_set": {"attn": [1]}, "threshold": "0.8"}, "threshold must be a number"),
    ({"kind": "layer_skip", "skip_set": {"attn": [1]}, "adaptive": "false"}, "adaptive must be true or false"),
    ({"kind": "layer_skip", "skip_set": {"attn": [1]}, "keep_unconfident": 0}, "keep_unconfident must be true"),
    ({"kind": "layer_skip", "skip_set": {"attn": [1]}, "max_draft_tokens": 4.0}, "max_draft_tokens must be an"),
    ({"kind": "prompt_lookup", "max_ngrams": 3}, "unknown fields"),
    ({"kind": "hybrid", "prompt_lookup": {}, "layer_skip": {}, "extra": 1}, "and nothing else"),
    ({"kind": "none", "threshold": 0.8}, "has no fields"),
])
def test_mistyped_policy_fields_are_refused(policy, words):
    with pytest.raises(KnnSsdError, match=words):
        drafter_from_policy(policy, num_layers=4)
