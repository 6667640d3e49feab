"""The shared losslessness test: every drafter, greedy, token-identical to the project's own plain decoding.

With the engine's batch-invariant kernels (`knnssd.engine.kernels`) a verify row computes the bits of the plain
step, so identity holds by construction; transformers' `generate` is a peer, equal up to near-ties (checked in
`test_plain_decoding_matches_generate_up_to_near_ties`)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.kernels import transformers_kernels
from knnssd.engine.drafters import LayerSkipConfig, LayerSkipDrafter
from knnssd.engine.drafters import HybridDrafter
from knnssd.engine.drafters import PromptLookupConfig, PromptLookupDrafter
from knnssd.engine.drafters import Draft, SuccessorTable, SuffixTreeConfig, SuffixTreeDrafter
from knnssd.engine.prompts import encode_prompt
from knnssd.engine.skipset import SkipSet
from tests.conftest import FAMILIES, spec_bench_rows, tiny_model

NUM_LAYERS = 4


class OracleTreeDrafter:
    """A hand-made adversarial token tree around the model's true greedy continuation (recomputed without a
    cache each step): a wrong branch first, then a branch right for a random number of tokens and then wrong,
    a deep branch that leaves it halfway and continues right (so the accepted path is neither the first branch
    nor in one piece of node order), a duplicate of the first true token, noise nodes on random parents, and
    true paths deeper than the loop's budget (which the loop must cut). Up to `max_nodes` nodes: more than 16
    leaves the grouped attention for transformers' own."""

    def __init__(self, seed: int = 0, max_nodes: int = 20) -> None:
        self.seed, self.max_nodes = seed, max_nodes

    def start(self):
        self.rng = torch.Generator().manual_seed(self.seed)
        return self

    def describe(self):
        return {"kind": "oracle_tree"}

    def observe(self, drafted, accepted):
        pass

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.rng))

    def truth(self, model, history: list[int], length: int) -> list[int]:
        ids = list(history)
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
        return ids[len(history):]

    def propose(self, request):
        vocab = request.model.config.vocab_size
        depth = min(request.max_tokens + 2, 8)  # past the budget near max_new_tokens
        truth = self.truth(request.model, request.history, depth)
        tokens, parents = [], []

        def add(token: int, parent: int) -> int:
            tokens.append(token % vocab)
            parents.append(parent)
            return len(tokens) - 1

        node = -1
        for step in range(self.randint(1, 3)):  # wrong from its first token
            node = add(truth[step] + 1 + step, node)
        right = self.randint(0, depth - 1)
        node, path = -1, []
        for step in range(right):
            node = add(truth[step], node)
            path.append(node)
        add(truth[right] + 2, node)
        if path:
            cut = self.randint(0, len(path) - 1)
            node = path[cut]
            for step in range(cut + 1, depth):
                node = add(truth[step], node)
        add(truth[0], -1)
        while len(tokens) < self.max_nodes:
            add(self.randint(0, vocab - 1), self.randint(-1, len(tokens) - 1))
        return Draft(tokens=torch.tensor(tokens), probs=None, parents=torch.tensor(parents))


def drafters_under_test():
    """(id, drafter or None) for every drafter kind the loop serves, with varied settings."""
    extreme = SkipSet.of(attn=range(NUM_LAYERS), mlp=range(NUM_LAYERS - 1))  # all but one sub-layer
    return [
        ("plain", None),
        ("empty-skip", LayerSkipDrafter(SkipSet(), LayerSkipConfig(threshold=0.0))),
        ("upper-attn", LayerSkipDrafter(SkipSet.of(attn=[2, 3]), LayerSkipConfig(threshold=0.0, max_draft_tokens=5))),
        ("mixed", LayerSkipDrafter(SkipSet.of(attn=[0, 3], mlp=[1]), LayerSkipConfig(threshold=0.3))),
        ("extreme", LayerSkipDrafter(extreme, LayerSkipConfig(threshold=0.0, max_draft_tokens=12))),
        ("adaptive", LayerSkipDrafter(SkipSet.of(mlp=[2, 3]), LayerSkipConfig(threshold=0.5, adaptive=True))),
        ("lookup", PromptLookupDrafter()),
        ("lookup-unigram-long", PromptLookupDrafter(PromptLookupConfig(max_ngram=1, max_draft_tokens=20))),
        ("lookup-4gram", PromptLookupDrafter(PromptLookupConfig(max_ngram=4, min_ngram=2, max_draft_tokens=3))),
        ("hybrid", HybridDrafter(PromptLookupDrafter(PromptLookupConfig(min_ngram=2)),
                                 LayerSkipDrafter(SkipSet.of(attn=[1, 3]), LayerSkipConfig(threshold=0.0)))),
        ("suffix-tree", SuffixTreeDrafter()),
        ("suffix-tree-wide", SuffixTreeDrafter(SuffixTreeConfig(max_ngram=2, max_depth=20, max_tree_nodes=24,
                                                                min_path_prob=0.01))),
        ("suffix-tree-store", SuffixTreeDrafter.with_store(
            [torch.randint(3, 128, (60,), generator=torch.Generator().manual_seed(n)) for n in range(4)],
            SuffixTreeConfig(max_ngram=1, min_path_prob=0.05))),
        ("oracle-tree", OracleTreeDrafter(seed=0)),
        ("suffix-tree-recycled", SuffixTreeDrafter(SuffixTreeConfig(max_tree_nodes=6, recycled_nodes=9))),
        ("suffix-tree-recycled-warm-wide", SuffixTreeDrafter(  # 26 nodes: past the fast kernels' 16 rows
            SuffixTreeConfig(max_ngram=2, max_depth=12, recycled_nodes=20, recycled_k=4),
            successors=SuccessorTable.of(torch.randint(0, 128, (128, 8), generator=torch.Generator().manual_seed(1))))),
        ("suffix-tree-adaptive", SuffixTreeDrafter(SuffixTreeConfig(spec_factor=1.0, spec_offset=1, recycled_nodes=4,
                                                                    min_path_prob=0.05))),
    ]


def reference(model, prompt_ids, max_new_tokens):
    """The project's own greedy plain decoding: what every drafter must reproduce token for token."""
    return generate(model, prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens)).token_ids


def transformers_generate(model, prompt_ids, max_new_tokens):
    """transformers' own greedy generate, with transformers' own linear layers and attention: (tokens, the
    logits (new, vocab) of each step)."""
    with transformers_kernels(model):
        out = model.generate(prompt_ids, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id)
    return tuple(out.sequences[0, prompt_ids.shape[1]:].tolist()), torch.cat(out.scores)


NEAR_TIE = 1e-4  # |top-1 - top-2| logit gap under which two fp32 computations of a step may pick differently


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decoding_matches_generate_up_to_near_ties(family):
    """The peer: plain decoding equals transformers' generate, or first departs from it at a step where
    transformers' own top two logits lie within NEAR_TIE (a near-tie, which different products may break
    differently)."""
    generator = torch.Generator().manual_seed(5)
    for seed in (0, 1, 2):
        model = tiny_model(family, seed=seed, num_layers=NUM_LAYERS)
        for prompt_length in (1, 9, 23):
            prompt = torch.randint(3, 128, (1, prompt_length), generator=generator)
            ours = reference(model, prompt, 40)
            theirs, scores = transformers_generate(model, prompt, 40)
            if ours != theirs:
                step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                top = scores[step].topk(2).values
                assert float(top[0] - top[1]) < NEAR_TIE, (family, seed, prompt_length, step)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_generate_on_tiny_models(family, seed):
    model = tiny_model(family, seed=seed, num_layers=NUM_LAYERS)
    generator = torch.Generator().manual_seed(100 + seed)
    for prompt_length in (1, 9, 23):
        prompt = torch.randint(3, 128, (1, prompt_length), generator=generator)
        expected = reference(model, prompt, 40)
        for name, drafter in drafters_under_test():
            got = generate(model, prompt, GenerationConfig(max_new_tokens=40), drafter)
            assert got.token_ids == expected, f"{family} seed {seed} len {prompt_length} drafter {name}"


def test_eos_stops_like_generate():
    """A model whose EOS is its most frequent greedy token: both stop at the same place, EOS included."""
    model = tiny_model("llama", seed=3)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    free_run = generate(model, prompt, GenerationConfig(max_new_tokens=30, eos_token_ids=()))
    eos = free_run.token_ids[7]
    model.generation_config.eos_token_id = eos
    expected = reference(model, prompt, 30)
    assert expected[-1] == eos and len(expected) <= 8
    for name, drafter in drafters_under_test():
        got = generate(model, prompt, GenerationConfig(max_new_tokens=30), drafter)
        assert got.token_ids == expected, name
        assert got.finish_reason == "eos"


def test_eos_inside_an_accepted_tree_path_ends_generation():
    """The oracle's true branch runs past EOS: the step accepts drafts beyond it, and the loop commits up to EOS."""
    model = tiny_model("llama", seed=3)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    free_run = generate(model, prompt, GenerationConfig(max_new_tokens=30, eos_token_ids=()))
    eos = free_run.token_ids[7]
    got = generate(model, prompt, GenerationConfig(max_new_tokens=30, eos_token_ids=(eos,)), OracleTreeDrafter(seed=1))
    assert got.token_ids == free_run.token_ids[:free_run.token_ids.index(eos) + 1] and got.finish_reason == "eos"
    # committed tokens after the prefill's = accepted + one bonus per step, unless tokens past EOS were dropped
    assert got.stats.accepted_tokens + got.stats.verify_steps > len(got.token_ids) - 1


def test_max_new_tokens_is_exact_with_long_drafts():
    model = tiny_model("qwen2", seed=4)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    drafter = LayerSkipDrafter(SkipSet(), LayerSkipConfig(threshold=0.0, max_draft_tokens=12))
    for n in (1, 2, 3, 13, 14):
        got = generate(model, prompt, GenerationConfig(max_new_tokens=n, eos_token_ids=()), drafter)
        assert len(got.token_ids) == n and got.finish_reason == "length"


@pytest.mark.parametrize("family", FAMILIES)
def test_trees_near_max_new_tokens_are_cut_to_the_budget(family):
    """The oracle's true path runs 2 tokens past the budget: the loop cuts the tree to depth budget - 1,
    accepts it whole, and stops exactly at max_new_tokens."""
    model = tiny_model(family, seed=4)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = generate(model, prompt, GenerationConfig(max_new_tokens=14, eos_token_ids=())).token_ids
    for n in (1, 2, 3, 4, 13, 14):
        got = generate(model, prompt, GenerationConfig(max_new_tokens=n, eos_token_ids=()), OracleTreeDrafter(seed=n))
        assert got.token_ids == expected[:n] and got.finish_reason == "length"
        assert got.stats.drafted_tokens > 0 or n <= 2  # with room for the bonus token only, nothing is drafted
        assert got.stats.accepted_tokens + got.stats.verify_steps == n - 1


@pytest.mark.slow
def test_smollm2_greedy_lossless_on_every_spec_bench_category(smollm2):
    """One Spec-Bench prompt per category (13), chat template, 64 new tokens, a real skip set."""
    first_by_category = {}
    for row in spec_bench_rows():
        first_by_category.setdefault(row["category"], row["turns"][0])
    assert len(first_by_category) == 13
    layer_skip = LayerSkipDrafter(SkipSet.of(attn=[5, 9, 13, 17, 21, 25], mlp=[26, 28]))
    drafters = {"layer_skip": layer_skip, "prompt_lookup": PromptLookupDrafter(),
                "hybrid": HybridDrafter(PromptLookupDrafter(PromptLookupConfig(min_ngram=2)), layer_skip),
                "suffix_tree": SuffixTreeDrafter()}
    accepted = defaultdict(float)
    for category, text in sorted(first_by_category.items()):
        prompt = encode_prompt(smollm2.tokenizer, text, chat=True)
        expected = reference(smollm2.model, prompt, 64)
        for name, drafter in drafters.items():
            got = generate(smollm2.model, prompt, GenerationConfig(max_new_tokens=64), drafter)
            assert got.token_ids == expected, (category, name)
            accepted[category, name] = got.stats.mean_accepted_tokens
    for name in drafters:
        mean = sum(v for (_, n), v in accepted.items() if n == name) / len(first_by_category)
        assert mean > 1.0, (name, dict(accepted))
