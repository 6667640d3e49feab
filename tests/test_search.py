"""Search settings that decide what a study is and what it sees (no Ray, no model)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from knnssd.engine.drafters import LayerSkipConfig, PromptLookupConfig
from knnssd.errors import KnnSsdError
from pipeline.mix import mix_search, mixed_prompts
from pipeline.search import study_name
from pipeline.space import SearchConfig, seed_trials


def test_a_study_is_named_by_its_prompts_too():
    config = SearchConfig()
    a = study_name("f" * 64, "coding", config, ["write a sort", "fix this bug"])
    assert a == study_name("f" * 64, "coding", config, ["write a sort", "fix this bug"])
    assert a != study_name("f" * 64, "coding", config, ["write a sort", "fix that bug"])  # other data: other study
    assert a != study_name("f" * 64, "coding", SearchConfig(max_new_tokens=64), ["write a sort", "fix this bug"])


def test_the_mix_study_sees_every_domain_evenly():
    domains = [f"d{i}" for i in range(6)]
    table = pa.table({"domain": [d for d in domains for _ in range(5)],
                      "prompt": [f"{d}-{j}" for d in domains for j in range(5)], "split": ["calibration"] * 30})
    search = mix_search(SearchConfig(prompts_per_trial=4), len(domains))
    seen = mixed_prompts(table)[:search.prompts_per_trial]
    assert search.prompts_per_trial == 6 and sorted(p.split("-")[0] for p in seen) == domains
    assert mix_search(SearchConfig(prompts_per_trial=8), 3).prompts_per_trial == 9


@pytest.mark.parametrize("seed, words", [
    ({"seed_layer_skip": LayerSkipConfig(threshold=0.85)}, "not on the search grid"),
    ({"seed_layer_skip": LayerSkipConfig(max_draft_tokens=20)}, "outside the searched range"),
    ({"seed_lookup": PromptLookupConfig(max_ngram=6)}, "outside the searched range"),
])
def test_seeds_off_the_search_space_are_refused(seed, words):
    with pytest.raises(KnnSsdError, match=words):
        SearchConfig(**seed)


def test_seed_trials_carry_the_seed_configs():
    config = SearchConfig(seed_lookup=PromptLookupConfig(max_ngram=2, max_draft_tokens=7))
    lookup = next(t for t in seed_trials(30, config) if t["kind"] == "prompt_lookup")
    assert lookup["prompt_lookup.max_ngram"] == 2 and lookup["prompt_lookup.max_draft_tokens"] == 7


def test_top_candidates_are_distinct_policies_and_scores_best_first(tmp_path):
    import optuna

    from pipeline.confirm import top_candidates

    study = optuna.create_study(direction="maximize")
    for number, (kind, value) in enumerate([("a", 1.1), ("b", 1.3), ("a", 1.2), ("c", 0.9), ("d", 1.25),
                                            ("e", 1.3)]):
        trial = optuna.trial.create_trial(value=value, user_attrs={"policy": {"kind": kind}})
        study.add_trial(trial)
    assert [t.user_attrs["policy"]["kind"] for t in top_candidates(study, 3)] == ["b", "d", "a"]
    # one policy scored by workers on two nodes (two step-cost tables): two scores, one candidate
    study = optuna.create_study(direction="maximize")
    for value, policy in [(1.31, {"kind": "p", "n": 1}), (1.30, {"n": 1, "kind": "p"}), (1.2, {"kind": "q"})]:
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"policy": policy}))
    assert [t.value for t in top_candidates(study, 3)] == [1.31, 1.2]


def test_the_confirmed_candidate_is_chosen_and_a_slow_one_falls_back_to_plain():
    from pipeline.confirm import Decision, choose_policy

    def candidate(kind, predicted, wall, mismatch=0.0):
        return {"policy": {"kind": kind}, "predicted": predicted, "search_predicted": predicted, "trial": ord(kind),
                "skip_ratio": 0.0, "confirmed": {"speedup": wall, "mean_accepted_tokens": 1.5, "acceptance_rate": 0.4,
                                                 "mismatch_rate": mismatch, "prompts": 8}}

    decision = Decision(str(ord("b")), 2, "faster beyond the spread")
    policy, metrics = choose_policy([candidate("a", 1.3, 1.1), candidate("b", 1.2, 1.2, 0.25)], 100, 1.0, decision)
    assert policy == {"kind": "b"} and metrics["confirmed_speedup"] == 1.2 and metrics["predicted_speedup"] == 1.2
    assert metrics["trials"] == 100 and metrics["mismatch_rate"] == 0.25  # a GPU near-tie is reported, not fatal
    assert metrics["confirm_rounds"] == 2 and metrics["confirmation"] == "faster beyond the spread"
    policy, metrics = choose_policy([candidate("a", 1.05, 0.97)], 100, 1.0, Decision(str(ord("a")), 1, "only one"))
    assert policy == {"kind": "none"} and metrics["speedup"] == 1.0 and metrics["searched_speedup"] == 0.97


def test_every_kind_gets_its_share_of_the_first_trials():
    from pipeline.space import kind_quota, seed_trials

    config = SearchConfig(trials=100, kind_share=0.15)
    first = seed_trials(30, config) + kind_quota(30, config)
    counts = {kind: sum(t["kind"] == kind for t in first) for kind in config.kinds}
    assert counts == {"layer_skip": 15, "prompt_lookup": 15, "hybrid": 15, "suffix_tree": 15}
    quota = kind_quota(30, config)
    assert [t["kind"] for t in quota[:3]] != ["layer_skip"] * 3  # round-robin, not one kind after another
    assert kind_quota(30, SearchConfig(trials=100, kind_share=0.0)) == []


def test_suffix_trees_are_searched_by_default_and_seeded_with_the_drafters_defaults():
    from knnssd.engine.drafters import SuffixTreeConfig
    from pipeline.space import SEARCHABLE_KINDS

    assert "suffix_tree" in SearchConfig().kinds == SEARCHABLE_KINDS
    for has_store in (False, True):
        tree = next(t for t in seed_trials(30, SearchConfig(), has_store) if t["kind"] == "suffix_tree")
        defaults = SuffixTreeConfig()
        assert tree["suffix_tree.max_tree_nodes"] == defaults.max_tree_nodes
        assert tree["suffix_tree.min_path_prob"] == defaults.min_path_prob
        assert tree.get("suffix_tree.use_store", False) is has_store  # the seed drafts from the store where one exists
    with pytest.raises(KnnSsdError, match="not on the search grid"):
        SearchConfig(seed_tree=SuffixTreeConfig(min_path_prob=0.15))
    with pytest.raises(KnnSsdError, match="outside the searched range"):
        SearchConfig(seed_tree=SuffixTreeConfig(max_tree_nodes=16))  # a 17-token pass: beyond the timed widths


@pytest.mark.parametrize("has_store", [False, True])
def test_suffix_tree_trials_draft_from_a_store_only_where_the_domain_has_one(has_store):
    """Random trials of a suffix-tree-only study: every policy builds, stays within the timed widths, and
    use_store is suggested (both ways) only with a store; a study without one never suggests it."""
    import optuna

    from knnssd.engine.policy import suffix_tree_config
    from pipeline.space import suggest_policy

    config = SearchConfig(kinds=("suffix_tree",))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    policies = []
    for _ in range(40):
        trial = study.ask()
        policies.append(suggest_policy(trial, 30, config, has_store))
        study.tell(trial, 1.0)
    trees = [suffix_tree_config(p) for p in policies]
    assert all(p["kind"] == "suffix_tree" for p in policies)
    assert all(t.max_tree_nodes + 1 <= 16 and t.min_ngram <= t.max_ngram for t in trees)
    assert {t.use_store for t in trees} == ({False, True} if has_store else {False})
    assert any("suffix_tree.use_store" in t.params for t in study.trials) is has_store


def test_a_study_with_a_store_is_another_study():
    from pipeline.stores import DomainStore

    store = DomainStore("coding", ("write a sort",), ((5, 6, 7),))
    other = DomainStore("coding", ("write a sort",), ((5, 6, 8),))
    names = {study_name("f" * 64, "coding", SearchConfig(), ["write a sort"], s) for s in (None, store, other)}
    assert len(names) == 3
