"""Prompt lookup's n-gram index, the suffix tree's merged continuations, the hybrid's choice of source, and
draft policies as JSON."""

from __future__ import annotations

import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import LayerSkipConfig, LayerSkipDrafter
from knnssd.errors import KnnSsdError
from knnssd.engine.drafters import HybridDrafter
from knnssd.engine.drafters import NgramIndex, PromptLookupConfig, PromptLookupDrafter
from knnssd.engine.drafters import DraftRequest, SuffixTreeConfig, SuffixTreeDrafter
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.tree import first_path
from knnssd.engine.policy import describe_policy, drafter_from_policy, policy_of
from knnssd.engine.skipset import SkipSet
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
        from knnssd.engine.drafters import Draft

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


def suffix_request(history, max_tokens=20):
    """What a suffix-tree session reads of a request: the history, the budget and the device."""
    return DraftRequest(model=None, cache=None, last_token=torch.tensor([[history[-1]]]), position=len(history) - 1,
                        max_tokens=max_tokens, sampling=SamplingConfig(), generator=None, history=history)


def as_paths(draft):
    """Every root-to-node path of a draft as a tuple of tokens, in node order."""
    tokens = draft.tokens.tolist()
    parents = draft.parents.tolist() if draft.parents is not None else list(range(-1, len(tokens) - 1))
    paths = []
    for node, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (tokens[node],))
    return paths


def test_suffix_tree_merges_continuations_by_count():
    # "1 2" occurred 3 times before the end: followed by 3 4, 3 5 and 7 -> node "3" has count 2 of 3
    history = [1, 2, 3, 4, 9, 1, 2, 3, 5, 9, 1, 2, 7, 9, 1, 2]
    session = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=2, min_path_prob=0.3)).start()
    draft = session.propose(suffix_request(history))
    # probabilities: 3: 2/3, 7: 1/3, then at depth 2 all 1/3, newest occurrence first: 7 9, 3 5, 3 4
    assert as_paths(draft) == [(3,), (7,), (7, 9), (3, 5), (3, 4)]
    assert draft.parents.tolist() == [-1, -1, 1, 0, 0] and draft.probs is None
    assert [tuple(first_path(draft).tokens.tolist())] == [(3, 5)]  # the most probable child first
    fewer = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=2, min_path_prob=0.5)).start()
    assert as_paths(fewer.propose(suffix_request(history))) == [(3,)]
    capped = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=2, max_tree_nodes=3, min_path_prob=0.3))
    assert as_paths(capped.start().propose(suffix_request(history))) == [(3,), (7,), (7, 9)]


def test_suffix_tree_with_one_occurrence_is_prompt_lookup():
    history = [7, 1, 2, 3, 9, 9, 1, 2, 3, 5, 6, 1, 2]
    lookup = NgramIndex(PromptLookupConfig(max_ngram=3, max_draft_tokens=4))
    lookup.update(history)
    draft = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=3, max_occurrences=1, max_depth=4)).start().propose(
        suffix_request(history))
    assert draft.parents is None and draft.tokens.tolist() == lookup.continuation(history, 4) == [3, 5, 6, 1]


def test_suffix_tree_depth_follows_the_budget_and_nothing_matches_gives_an_empty_draft():
    history = [4, 5, 6, 7, 8, 4, 5]
    session = SuffixTreeDrafter().start()
    assert session.propose(suffix_request(history, max_tokens=2)).tokens.tolist() == [6, 7]
    assert session.propose(suffix_request(history + [99])).tokens.shape == (0,)


def test_suffix_tree_index_takes_new_tokens_only_and_keeps_the_latest_occurrences():
    config = SuffixTreeConfig(max_ngram=2, max_occurrences=3)
    session = SuffixTreeDrafter(config).start()
    history = [1, 2] * 10
    session.propose(suffix_request(history))
    assert session.index.indexed == len(history) - 1
    assert list(session.index.ends[(1, 2)]) == [13, 15, 17]  # capped: the trie never grows with the text
    history += [1, 2]
    session.propose(suffix_request(history))
    assert session.index.indexed == len(history) - 1 and list(session.index.ends[(1, 2)]) == [15, 17, 19]


def test_suffix_tree_store_is_a_second_source_and_continuations_stop_at_array_ends():
    store = [[8, 1, 2, 6, 6], [3, 1, 2], [1, 2, 7]]
    drafter = SuffixTreeDrafter.with_store(store, SuffixTreeConfig(max_ngram=2, max_depth=3, min_path_prob=0.1))
    draft = drafter.start().propose(suffix_request([5, 1, 2]))
    # the text has no earlier "1 2"; the store has three, one at an array's end (no continuation, not indexed)
    assert sorted(as_paths(draft)) == [(6,), (6, 6), (7,)]
    assert drafter.store.arrays == 3
    text_first = drafter.start().propose(suffix_request([1, 2, 9, 1, 2]))
    assert as_paths(text_first)[0] == (9,)  # equal counts: the text's occurrence before the store's
    with pytest.raises(KnnSsdError, match="token ids"):
        SuffixTreeDrafter.with_store([[1, 2, -3]])


@pytest.mark.parametrize("kwargs, words", [
    ({"min_path_prob": 0}, "min_path_prob"), ({"min_path_prob": 1.5}, "min_path_prob"),
    ({"min_path_prob": "0.1"}, "must be a number"), ({"max_tree_nodes": 0}, "max_tree_nodes"),
    ({"max_ngram": 1, "min_ngram": 2}, "min_ngram <= max_ngram"), ({"max_depth": 2.0}, "must be an integer"),
])
def test_bad_suffix_tree_config(kwargs, words):
    with pytest.raises(KnnSsdError, match=words):
        SuffixTreeConfig(**kwargs)


def test_suffix_tree_policy_round_trip_and_description():
    drafter = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=3, max_tree_nodes=7, min_path_prob=0.2))
    policy = policy_of(drafter)
    assert policy["kind"] == "suffix_tree" and drafter_from_policy(policy, num_layers=4) == drafter
    assert describe_policy(policy) == "suffix_tree n=1-3 occ<=16 depth<=10 nodes<=7 p>=0.2"
    with pytest.raises(KnnSsdError, match="unknown fields"):
        drafter_from_policy({"kind": "suffix_tree", "max_nodes": 3}, num_layers=4)


def test_suffix_tree_drafts_trees_on_repetitive_text():
    model = tiny_model("llama", seed=0)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 9, 8, 5, 6, 7, 3] * 3])
    stats = generate(model, prompt, GenerationConfig(max_new_tokens=30, eos_token_ids=()),
                     SuffixTreeDrafter(SuffixTreeConfig(min_path_prob=0.05))).stats
    assert stats.draft_forwards == 0 and stats.tree_steps > 0 and stats.mean_verify_width > 2
