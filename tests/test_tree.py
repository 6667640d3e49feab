"""Token trees (knnssd/engine/tree.py): the mask, greedy acceptance, cache compaction, the loop's contract, stats."""

from __future__ import annotations

import time

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from knnssd.engine.attention import IMPLEMENTATION, set_implementation
from knnssd.engine.decoding import GenerationConfig, generate, prefill, verify
from knnssd.engine.drafters import Draft
from knnssd.errors import KnnSsdError
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.stats import StatsRecorder
from knnssd.engine.tree import (accept_greedy, ancestors, depths, first_path, nodes_per_depth, tree_mask,
                         within_depth)
from tests.conftest import FAMILIES, tiny_model

GREEDY = SamplingConfig()


def tree(tokens, parents):
    return Draft(tokens=torch.tensor(tokens), probs=None, parents=torch.tensor(parents))


def prefilled(model, length, seed=0):
    prompt = torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    return prompt, prefill(model, prompt, GREEDY, None, time.perf_counter)


def greedy_continuation(model, prompt, n):
    return list(generate(model, prompt, GenerationConfig(max_new_tokens=n, eos_token_ids=())).token_ids)


# parents of a small tree: two root children (0, 3), node 0 -> 1 -> 2, node 3 -> 4 and 3 -> 5, 5 -> 6
PARENTS = [-1, 0, 1, -1, 3, 3, 5]


def test_depths_and_nodes_per_depth():
    assert depths(PARENTS) == [1, 2, 3, 1, 2, 2, 3]
    assert nodes_per_depth(tree([0] * 7, PARENTS)) == [2, 3, 2]
    assert nodes_per_depth(Draft(tokens=torch.tensor([1, 2]), probs=None)) is None


def test_ancestors_matrix():
    seen = ancestors(PARENTS)
    assert seen.shape == (8, 8)
    # row 1 + 6 (node 6) sees the root, node 3, node 5 and itself
    assert seen[7].nonzero().flatten().tolist() == [0, 4, 6, 7]
    assert seen[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert seen[0].nonzero().flatten().tolist() == [0]


def test_first_path_within_depth_and_chains_become_paths():
    draft = tree([10, 11, 12, 13, 14, 15, 16], PARENTS)
    path = first_path(draft)
    assert path.parents is None and path.tokens.tolist() == [10, 11, 12]
    cut = within_depth(draft, 2)
    assert cut.tokens.tolist() == [10, 11, 13, 14, 15] and cut.parents.tolist() == [-1, 0, -1, 2, 2]
    one = within_depth(draft, 1)
    assert one.tokens.tolist() == [10, 13] and one.parents.tolist() == [-1, -1]
    chain = within_depth(tree([1, 2, 3], [-1, 0, 1]), 5)
    assert chain.parents is None and chain.tokens.tolist() == [1, 2, 3]


def test_greedy_acceptance_takes_the_deepest_agreeing_path_not_the_first_branch():
    vocab = 20
    targets = {0: 13, 4: 16, 6: 9}  # row -> target argmax (row 0: after the root, 1 + i: after node i)
    logits = torch.zeros(8, vocab)
    for row in range(8):
        logits[row, targets.get(row, 19)] = 1.0
    tokens = [10, 11, 12, 13, 15, 16, 9]  # branch 0-1-2 wrong at once; 3 right, 4 wrong, 5 right, 6 right
    path, bonus = accept_greedy(tokens, PARENTS, logits)
    assert path == [3, 5, 6] and bonus == 19  # row 7 (after node 6) has no entry: argmax 19
    path, bonus = accept_greedy([1, 2, 3, 4, 5, 6, 7], PARENTS, logits)
    assert path == [] and bonus == 13


def test_equally_deep_duplicates_take_the_first_in_node_order():
    logits = torch.zeros(4, 10)
    logits[0, 4] = logits[1, 5] = logits[2, 5] = logits[3, 6] = 1.0
    path, bonus = accept_greedy([4, 4, 5], [-1, -1, 1], logits)
    assert path == [1, 2] and bonus == 6
    path, bonus = accept_greedy([4, 4], [-1, -1], logits)
    assert path == [0] and bonus == 5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_length", [5, 30])  # 30 is past the tiny Mistral's sliding window of 16
def test_a_chain_gets_transformers_own_causal_mask(family, prompt_length):
    model = tiny_model(family, seed=1)
    _, state = prefilled(model, prompt_length)
    k = 5
    mask = tree_mask(model, state.cache, list(range(-1, k - 1)), prompt_length)
    make = create_sliding_window_causal_mask if family == "mistral" else create_causal_mask
    expected = make(config=model.config, inputs_embeds=torch.zeros(1, k + 1, model.config.hidden_size),
                    attention_mask=None, cache=state.cache,
                    position_ids=torch.arange(prompt_length, prompt_length + k + 1)[None])
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_tree_mask_rows_see_the_cache_and_their_ancestors():
    model = tiny_model("llama", seed=1)
    _, state = prefilled(model, 4)
    mask = tree_mask(model, state.cache, PARENTS, 4)
    assert mask.shape == (1, 1, 8, 4 + 8)
    assert mask[0, 0, :, :4].all()
    assert torch.equal(mask[0, 0, :, 4:], ancestors(PARENTS))


def true_path_tree(truth, vocab):
    """A tree whose first branch is wrong and whose third branch follows `truth` for 3 tokens, then errs."""
    wrong = [(t + 1) % vocab for t in truth]
    tokens = [wrong[0], wrong[1], truth[0], wrong[1], truth[1], truth[2], wrong[3], truth[0]]
    parents = [-1, 0, -1, 2, 2, 4, 5, 4]
    return tokens, parents  # accepted: nodes 2, 4, 5 (truth[:3]); node 7 (truth[0] at depth 3) is rejected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_length", [6, 30])
def test_a_tree_pass_accepts_the_true_branch_and_compacts_the_cache(family, prompt_length):
    """After one tree pass, the cache equals a prefill over the prompt and the committed tokens."""
    model = tiny_model(family, seed=2)
    prompt, state = prefilled(model, prompt_length, seed=3)
    truth = greedy_continuation(model, prompt, 6)  # truth[0] is the prefill's token
    tokens, parents = true_path_tree(truth[1:], model.config.vocab_size)
    accepted, bonus = verify(model, state.cache, truth[0], tree(tokens, parents), prompt_length, GREEDY, None)
    assert accepted == truth[1:4] and bonus == truth[4]
    committed = prompt_length + 1 + len(accepted)
    assert all(layer.get_seq_length() == committed for layer in state.cache.layers)
    reference = prefill(model, torch.tensor([prompt[0].tolist() + truth[:4]]), GREEDY, None, time.perf_counter)
    for got, want in zip(state.cache.layers, reference.cache.layers):
        held = got.keys.shape[-2]  # a sliding-window layer keeps its last window - 1 entries once cropped
        assert held == (min(committed, 15) if family == "mistral" else committed)
        assert torch.allclose(got.keys, want.keys[:, :, -held:], atol=1e-5)
        assert torch.allclose(got.values, want.values[:, :, -held:], atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_grouped_attention_gives_the_same_tree_logits(implementation):
    """grouped_sdpa (registered at load for 2-16 query rows) takes the bool tree mask as transformers' SDPA and
    eager attention (additive float mask) do."""
    model = tiny_model("qwen2", seed=5)
    assert model.config._attn_implementation == IMPLEMENTATION
    prompt, state = prefilled(model, 12)
    draft = tree(list(range(20, 27)), PARENTS)

    def logits_of():
        _, cached = prefilled(model, 12)
        mask = tree_mask(model, cached.cache, PARENTS, 12)
        ids = torch.tensor([[7] + draft.tokens.tolist()])
        positions = (12 + torch.tensor([0] + depths(PARENTS)))[None]
        return model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cached.cache).logits[0]

    grouped = logits_of()
    set_implementation(model, implementation)
    try:
        other = logits_of()
    finally:
        set_implementation(model, IMPLEMENTATION)
    assert torch.allclose(grouped, other, atol=1e-5)


class FixedTree:
    """A user's drafter that always proposes the same tree."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft

    def start(self):
        return self

    def describe(self):
        return {"kind": "fixed_tree"}

    def propose(self, request):
        return self.draft

    def observe(self, drafted, accepted):
        pass


@pytest.mark.parametrize("draft, words", [
    (Draft(torch.tensor([1, 2]), None, parents=torch.tensor([0, -1])), "topological order"),
    (Draft(torch.tensor([1, 2]), None, parents=torch.tensor([-1])), "shape"),
    (Draft(torch.tensor([1, 2]), None, parents=torch.tensor([-1.0, 0.0])), "dtype"),
    (Draft(torch.tensor([1, 2]), None, parents=torch.tensor([-2, 0])), "topological order"),
    (Draft(torch.tensor([1]), torch.full((1, 128), 1 / 128), parents=torch.tensor([-1])), "distributions"),
])
def test_malformed_trees_are_refused_by_name(draft, words):
    model = tiny_model("llama", seed=0)
    with pytest.raises(KnnSsdError, match=words) as caught:
        generate(model, torch.tensor([[5, 6, 7]]), GenerationConfig(max_new_tokens=4, eos_token_ids=()),
                 FixedTree(draft))
    assert "FixedTree" in str(caught.value) and "fix:" in str(caught.value)


def test_under_sampling_only_the_first_path_is_verified():
    model = tiny_model("llama", seed=0)
    draft = tree([10, 11, 12, 13, 14, 15, 16], PARENTS)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=(),
                              sampling=SamplingConfig(temperature=1.0, seed=0))
    stats = generate(model, torch.tensor([[5, 6, 7]]), config, FixedTree(draft)).stats
    assert stats.tree_steps == 0 and len(stats.verify_widths) <= 4  # never wider than the last token + 3
    assert len(stats.drafted_by_position) == 3  # node 0 -> 1 -> 2, the first path


def test_tree_steps_are_recorded_with_their_widths():
    model = tiny_model("llama", seed=0)
    draft = tree([10, 11, 12, 13, 14, 15, 16], PARENTS)
    stats = generate(model, torch.tensor([[5, 6, 7]]), GenerationConfig(max_new_tokens=5, eos_token_ids=()),
                     FixedTree(draft)).stats
    # budgets 4, 3, 2 allow depths 3, 2, 1 (widths 8, 6, 3); any accepted node shortens what follows
    assert stats.tree_steps == stats.verify_steps - (1 if stats.verify_widths[0] else 0)
    assert sum(stats.verify_widths) == stats.verify_steps
    assert stats.mean_verify_width == pytest.approx(
        sum((w + 1) * n for w, n in enumerate(stats.verify_widths)) / stats.verify_steps)
    assert stats.to_dict()["verify_widths"] == list(stats.verify_widths)


def test_recorder_counts_tree_nodes_by_depth():
    recorder = StatsRecorder()
    recorder.record_step(drafted=7, accepted=2, by_depth=[2, 3, 2])
    recorder.record_step(drafted=2, accepted=1)
    recorder.record_step(drafted=0, accepted=0)
    stats = recorder.finish(new_tokens=7, total_seconds=1.0)
    assert stats.drafted_by_position == (3, 4, 2) and stats.accepted_by_position == (2, 1, 0)
    assert (stats.drafted_tokens, stats.accepted_tokens, stats.tree_steps) == (9, 3, 1)
    assert stats.verify_widths == (1, 0, 1, 0, 0, 0, 0, 1)
    assert stats.mean_verify_width == pytest.approx((9 + 3) / 3)
    with pytest.raises(ValueError):
        recorder.record_step(drafted=3, accepted=0, by_depth=[1, 1])
