"""A use_warm suffix tree in calibration: each calibration prompt starts from its domain's leave-one-out warm table,
replay of it equals the real loop exactly, and the search suggests use_warm only where it can apply."""

from __future__ import annotations

import numpy as np
import optuna
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from pipeline.drafting import PolicyDrafters
from pipeline.replay import replay
from pipeline.scoring import build_workload, score_policy
from pipeline.search import store_fingerprint
from pipeline.space import SearchConfig, suggest_policy
from pipeline.stores import DomainStore
from pipeline.successors import model_vocab, output_successors
from tests.conftest import tiny_model
from tests.test_replay import branching_prompt, costs

WARM = {"kind": "suffix_tree", "max_ngram": 2, "max_tree_nodes": 4, "max_depth": 6, "recycled_nodes": 8,
        "recycled_k": 4, "use_warm": True}
TOKENS = 24


def counted(stats):
    return (stats.verify_steps, stats.drafted_tokens, stats.accepted_tokens, tuple(stats.verify_widths))


def warm_store(model, prompts, texts) -> DomainStore:
    outputs = [generate(model, ids, GenerationConfig(max_new_tokens=TOKENS)).token_ids for ids in prompts]
    return DomainStore(domain="d", prompts=tuple(texts), outputs=tuple(outputs),
                       successors=output_successors(model, prompts, outputs), vocab=model_vocab(model))


def test_a_warm_replay_on_each_calibration_prompt_equals_the_real_loop_with_its_leave_one_out_table():
    model = tiny_model("llama")
    prompts = [branching_prompt(seed) for seed in (1, 2, 3)] + [
        torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))]
    texts = [f"prompt {i}" for i in range(len(prompts))]
    store = warm_store(model, prompts, texts)
    workload = build_workload(model, prompts, TOKENS, texts)
    drafters = PolicyDrafters(4)
    for policy in (WARM, {**WARM, "use_store": True}):
        for index, (ids, text) in enumerate(zip(prompts, texts)):
            drafter = drafters.drafter(policy, store, text)
            assert np.array_equal(drafter.successors.table, store.table(exclude=text).table)
            if index == len(prompts) - 1:  # the last entry's rows are written last: leaving them out shows
                assert not np.array_equal(drafter.successors.table, store.table().table)
            real = generate(model, ids, GenerationConfig(max_new_tokens=TOKENS), drafter)
            replayed = replay(drafter, workload.traces[index])
            assert counted(replayed.recorded().finish(0, 0.0)) == counted(real.stats), (policy, index)
        held_out = drafters.drafter(policy, store, "a held-out prompt")
        assert np.array_equal(held_out.successors.table, store.table().table)
    warm = score_policy(model, WARM, 4, workload, costs(), store, drafters)
    cold = score_policy(model, {**WARM, "use_warm": False}, 4, workload, costs(), store, drafters)
    assert warm != cold  # the warm table reached the replayed trees, hence the score


def test_use_warm_is_suggested_only_with_successors_and_recycling():
    config = SearchConfig(kinds=("suffix_tree",))
    fixed = {"kind": "suffix_tree", "suffix_tree.max_ngram": 2, "suffix_tree.min_ngram": 1,
             "suffix_tree.max_occurrences": 4, "suffix_tree.max_depth": 4, "suffix_tree.max_tree_nodes": 4,
             "suffix_tree.min_path_prob": 0.1, "suffix_tree.spec_factor": 0.0, "suffix_tree.spec_offset": 0,
             "suffix_tree.recycled_k": 4, "suffix_tree.use_store": False}
    recycling = optuna.trial.FixedTrial({**fixed, "suffix_tree.recycled_nodes": 8, "suffix_tree.use_warm": True})
    assert suggest_policy(recycling, 4, config, has_store=True, has_warm=True)["use_warm"] is True
    assert suggest_policy(recycling, 4, config, has_store=True, has_warm=False)["use_warm"] is False
    cold = optuna.trial.FixedTrial({**fixed, "suffix_tree.recycled_nodes": 0})  # use_warm is never read
    assert suggest_policy(cold, 4, config, has_store=True, has_warm=True)["use_warm"] is False


def test_the_store_fingerprint_changes_with_its_successors():
    model = tiny_model("llama")
    prompts = [branching_prompt(1), branching_prompt(2)]
    store = warm_store(model, prompts, ["a", "b"])
    bare = DomainStore(domain="d", prompts=store.prompts, outputs=store.outputs)
    other = DomainStore(domain="d", prompts=store.prompts, outputs=store.outputs,
                        successors=store.successors[:1] + (store.successors[1][::-1],),
                        vocab=store.vocab)
    assert len({store_fingerprint(store), store_fingerprint(bare), store_fingerprint(other)}) == 3
