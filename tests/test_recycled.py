"""Recycled successors (`knnssd.engine.drafters.recycled`), the adaptive depth and the compact store index of the
suffix tree (`knnssd.engine.drafters.suffix_tree`), and their policy fields and search space."""

from __future__ import annotations

import random

import optuna
import pytest
import torch

from knnssd.engine.drafters import (DraftRequest, OccurrenceIndex, StoreIndex, SuccessorTable, SuffixStore,
                                    SuffixTreeConfig, SuffixTreeDrafter)
from knnssd.engine.policy import describe_policy, drafter_from_policy, policy_of
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.tree import first_path
from knnssd.errors import KnnSsdError
from pipeline.space import RECYCLED_NODES, SearchConfig, suggest_tree


def request(history, max_tokens=10):
    return DraftRequest(model=None, cache=None, last_token=torch.tensor([[history[-1]]]), position=len(history) - 1,
                        max_tokens=max_tokens, sampling=SamplingConfig(), generator=None, history=history)


def paths(draft):
    tokens = draft.tokens.tolist()
    parents = draft.parents.tolist() if draft.parents is not None else list(range(-1, len(tokens) - 1))
    out = []
    for node, parent in enumerate(parents):
        out.append((out[parent] if parent >= 0 else ()) + (tokens[node],))
    return out


def test_recycled_successors_draft_where_the_text_has_no_match_and_learn_from_committed_rows():
    session = SuffixTreeDrafter(SuffixTreeConfig(recycled_nodes=3, recycled_k=2)).start()
    assert session.propose(request([50, 51])).tokens.shape == (0,)  # an empty table, no match: nothing
    logits = torch.zeros(2, 100)
    logits[0, [7, 8, 9]] = torch.tensor([3.0, 2.0, 1.0])  # after 51: 7, then 8 (k=2 keeps two)
    logits[1, [5, 6]] = torch.tensor([2.0, 1.0])  # after 7: 5, then 6
    session.observe_logits(torch.tensor([51, 7]), logits)
    draft = session.propose(request([50, 51]))
    # best first by 0.5^(rank+1) products: 7 (0.5), then 8 and 7->5 (0.25 each; shallower first)
    assert paths(draft) == [(7,), (8,), (7, 5)]
    assert first_path(draft).tokens.tolist() == [7, 5]  # the rank-0 chain is the first path


def test_recycled_nodes_extend_the_matched_tree_and_never_duplicate_a_node():
    history = [1, 2, 3, 4, 9, 1, 2]
    plain = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=3)).start().propose(request(history))
    warm = SuccessorTable.of([[-1] * 2] * 3 + [[4, 8]] + [[6, -1]] + [[-1] * 2] * 5)  # 3 -> 4, 8; 4 -> 6
    session = SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=3, recycled_nodes=2), successors=warm).start()
    merged = paths(session.propose(request(history)))
    assert merged[:len(paths(plain))] == paths(plain) == [(3,), (3, 4), (3, 4, 9)]
    # 3 -> 4 is already a node (not added again); 4 -> 6 (1 x 0.5) before 3 -> 8 (1 x 0.25); 9 is at max_depth
    assert merged[3:] == [(3, 4, 6), (3, 8)]
    assert len(set(merged)) == len(merged)


def test_adaptive_depth_caps_a_match_by_its_length():
    history = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    for factor, offset, expected in ((0.0, 0, 8), (1.0, 0, 2), (1.0, 2, 4), (0.5, -1, 0), (4.0, 0, 8)):
        config = SuffixTreeConfig(max_ngram=2, spec_factor=factor, spec_offset=offset)
        assert len(SuffixTreeDrafter(config).start().propose(request(history)).tokens) == expected, (factor, offset)


def test_the_compact_store_index_finds_what_the_deque_index_finds():
    rng = random.Random(0)
    arrays = [[rng.randrange(5) for _ in range(rng.randrange(0, 30))] for _ in range(20)]
    config = SuffixTreeConfig(min_ngram=1, max_ngram=3, max_occurrences=4)
    store = SuffixStore.of(arrays, config)
    reference = OccurrenceIndex(config)
    reference.update(store.tokens.tolist())
    assert isinstance(store.index, StoreIndex) and store.arrays == 20
    for gram in reference.ends:
        assert store.index.latest(gram, 4) == list(reference.ends[gram]), gram
    assert store.index.latest((9, 9), 4) == [] and store.index.latest((1, 2, 3, 4), 4) == []


@pytest.mark.parametrize("kwargs, words", [
    ({"recycled_nodes": -1}, "recycled_nodes"), ({"recycled_k": 9}, "recycled_k"), ({"recycled_k": 0}, "recycled_k"),
    ({"spec_factor": -1.0}, "spec_factor"), ({"spec_factor": "1"}, "must be a number"),
    ({"spec_offset": 0.5}, "must be an integer"), ({"recycled_nodes": True}, "must be an integer"),
])
def test_bad_recycled_or_adaptive_config(kwargs, words):
    with pytest.raises(KnnSsdError, match=words):
        SuffixTreeConfig(**kwargs)


def test_bad_successor_tables_are_refused():
    with pytest.raises(KnnSsdError, match="vocab, k"):
        SuccessorTable.of([1, 2, 3])
    with pytest.raises(KnnSsdError, match="outside"):
        SuccessorTable.of([[0, 5], [1, 0]])


def test_policy_json_reads_the_new_fields_and_old_policies_keep_them_off():
    old = drafter_from_policy({"kind": "suffix_tree", "max_ngram": 3}, num_layers=4)
    assert old.config.recycled_nodes == 0 and old.config.spec_factor == 0
    new = {"kind": "suffix_tree", "recycled_nodes": 8, "recycled_k": 4, "spec_factor": 2.0, "spec_offset": 1}
    drafter = drafter_from_policy(new, num_layers=4)
    assert policy_of(drafter) == {**policy_of(SuffixTreeDrafter()), **new}
    assert describe_policy(new).endswith("depth<=2.0n+1 +recycled 8x4")
    with pytest.raises(KnnSsdError, match="recycled_k"):
        drafter_from_policy({"kind": "suffix_tree", "recycled_k": 12}, num_layers=4)


def test_the_search_space_suggests_the_new_fields_and_the_seed_keeps_them_off():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        fields = suggest_tree(study.ask(), has_store=False)
        SuffixTreeConfig(**{k: v for k, v in fields.items()})  # every suggestion is a valid config
        seen.add(fields["recycled_nodes"])
    assert seen == set(RECYCLED_NODES)
    assert SearchConfig().seed_tree.recycled_nodes == 0 and SearchConfig().seed_tree.spec_factor == 0
    with pytest.raises(KnnSsdError, match="recycled_nodes"):
        SearchConfig(seed_tree=SuffixTreeConfig(recycled_nodes=5))
