"""Store scope of suffix-tree policies: drafting from the domain's own store, the union of every domain's, or per
step the better of the two; refusals, the runtime's stores, lossless output, exact replay, leave-one-out and the
search's parameter."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import optuna
import pytest

from knnssd.bundle import join_store
from knnssd.bundle.runtime import load_bundle
from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import SuffixStore, SuffixTreeConfig, SuffixTreeDrafter
from knnssd.engine.policy import describe_policy, drafter_from_policy
from knnssd.errors import KnnSsdError
from pipeline.drafting import PolicyDrafters
from pipeline.replay import replay
from pipeline.scoring import build_workload
from pipeline.search import store_fingerprint
from pipeline.space import SearchConfig, suggest_policy
from pipeline.stores import DomainStore
from tests.bundles import TINY_PROMPTS, loaded  # noqa: F401 (fixture)
from tests.conftest import tiny_model
from tests.test_drafters import as_paths, suffix_request
from tests.test_replay import branching_prompt, repetitive_prompt
from tests.test_stores import NEW_TOKENS, outputs, store_bundle  # noqa: F401 (fixture)

TREE = {"kind": "suffix_tree", "max_ngram": 3, "max_occurrences": 8, "max_depth": 6, "max_tree_nodes": 8,
        "min_path_prob": 0.1, "use_store": True}
TOKENS = 24


def counted(stats):
    return (stats.verify_steps, stats.drafted_tokens, stats.accepted_tokens, tuple(stats.verify_widths))


def test_store_scope_is_checked_and_described():
    assert SuffixTreeConfig().store_scope == "own"
    for bad in ("all", "", 1, None):
        with pytest.raises(KnnSsdError, match="store_scope must be one of own, union, both"):
            SuffixTreeConfig(store_scope=bad)
    with pytest.raises(KnnSsdError, match="store_scope must be one of"):
        drafter_from_policy({**TREE, "store_scope": "mix"}, 4, store=[(1, 2)], union_store=[(1, 2)])
    assert describe_policy(TREE).endswith(" +store")
    assert describe_policy({**TREE, "store_scope": "union"}).endswith(" +store(union)")
    assert describe_policy({**TREE, "store_scope": "both"}).endswith(" +store(both)")
    assert "+store" not in describe_policy({**TREE, "use_store": False, "store_scope": "union"})  # read with use_store


def test_a_policy_gets_exactly_the_stores_its_scope_needs():
    own, union = [(5, 6, 7)], [(5, 6, 7), (5, 6, 8)]
    for scope in ("union", "both"):
        with pytest.raises(KnnSsdError, match="union of every domain's store .* but no union was given"):
            drafter_from_policy({**TREE, "store_scope": scope}, 4, store=own)
    for scope in ("own", "both"):
        with pytest.raises(KnnSsdError, match="drafts from a store .* but none was given"):
            drafter_from_policy({**TREE, "store_scope": scope}, 4, union_store=union)
    only_union = drafter_from_policy({**TREE, "store_scope": "union"}, 4, union_store=union)
    assert only_union.store is None and only_union.union.arrays == 2 and only_union.stores() == (only_union.union,)
    both = drafter_from_policy({**TREE, "store_scope": "both"}, 4, store=own, union_store=union)
    assert (both.store.arrays, both.union.arrays) == (1, 2) and both.stores() == (both.store, both.union)
    assert drafter_from_policy(TREE, 4, store=own, union_store=union).union is None  # "own" ignores the union
    shared = SuffixStore.of(union, SuffixTreeConfig(max_ngram=3))  # an index given as is, if its sizes fit
    assert drafter_from_policy({**TREE, "store_scope": "union"}, 4, union_store=shared).union is shared
    with pytest.raises(KnnSsdError, match="covers n-grams .* matches 1..2"):
        drafter_from_policy({**TREE, "max_ngram": 2, "store_scope": "union"}, 4, union_store=shared)


def scoped(scope, own, union):
    config = SuffixTreeConfig(max_ngram=2, max_occurrences=16, max_depth=4, max_tree_nodes=15, min_path_prob=0.1,
                              use_store=True, store_scope=scope)
    return SuffixTreeDrafter.with_store(own, config, union=union)


WEAK = [(5, 6, 7), (5, 6, 8), (5, 6, 9), (5, 6, 10)]  # four continuations of "5 6": path probabilities 1/4 each
STRONG = [(5, 6, 20, 21, 22)] * 2  # one continuation, twice: path probabilities 1 each


@pytest.mark.parametrize("own, union, winner", [(WEAK, WEAK + STRONG, "union"), (STRONG, STRONG + WEAK, "own")])
def test_both_keeps_the_candidate_tree_of_larger_expected_accepted_tokens(own, union, winner):
    """Own weak (expected 4 x 1/4 = 1) against a union with a strong match (3 x 2/6 + 4 x 1/6 = 5/3), and the
    reverse (3 against 5/3): "both" drafts the winner's tree, node for node."""
    history = [1, 2, 5, 6]
    drafts = {scope: as_paths(scoped(scope, own, union).start().propose(suffix_request(history)))
              for scope in ("own", "union", "both")}
    assert drafts["own"] != drafts["union"]
    assert drafts["both"] == drafts[winner]
    assert (20, 21, 22) in drafts["both"]  # the strong continuation is drafted either way


def test_both_keeps_the_own_tree_on_a_tie():
    own, union = [(5, 6, 7, 8)], [(5, 6, 9, 10)]  # expected 2 each
    history = [1, 2, 5, 6]
    drafts = {scope: as_paths(scoped(scope, own, union).start().propose(suffix_request(history)))
              for scope in ("own", "union", "both")}
    assert drafts["own"] == [(7,), (7, 8)] and drafts["union"] == [(9,), (9, 10)] and drafts["both"] == drafts["own"]


def stores_of(model):
    """Domain a (branching prompts) with its union with domain b (repetitive prompts), each prompt's greedy
    output; the texts name the prompts."""
    prompts = {"a": [branching_prompt(seed) for seed in (1, 2, 3)], "b": [repetitive_prompt(seed) for seed in (4, 5)]}
    stores = {domain: DomainStore(domain=domain, prompts=tuple(f"{domain}{i}" for i in range(len(ids))),
                                  outputs=tuple(generate(model, p, GenerationConfig(max_new_tokens=TOKENS)).token_ids
                                                for p in ids))
              for domain, ids in prompts.items()}
    union = DomainStore.union(stores.values(), "mix")
    return prompts, {domain: replace(store, union_store=union) for domain, store in stores.items()}, union


def test_every_scope_is_lossless_and_the_union_reaches_the_drafter():
    """A prompt of domain b, held out for domain a: its output is in the union but not in a's store, so the union
    and both drafters accept more than the own one; every output is plain decoding's."""
    model = tiny_model("llama")
    prompts, stores, _ = stores_of(model)
    drafters = PolicyDrafters(4)
    for ids in prompts["b"]:
        plain = generate(model, ids, GenerationConfig(max_new_tokens=TOKENS)).token_ids
        accepted = {}
        for scope in ("own", "union", "both"):
            drafter = drafters.drafter({**TREE, "store_scope": scope}, stores["a"], "a held-out prompt")
            result = generate(model, ids, GenerationConfig(max_new_tokens=TOKENS), drafter)
            assert result.token_ids == plain, scope
            accepted[scope] = result.stats.accepted_tokens
        assert accepted["union"] > accepted["own"] and accepted["both"] > accepted["own"], accepted


def test_union_and_both_replay_equal_the_real_loop_with_the_leave_one_out_union():
    model = tiny_model("llama")
    prompts, stores, union = stores_of(model)
    store, texts = stores["a"], list(stores["a"].prompts)
    workload = build_workload(model, prompts["a"], TOKENS, texts)
    drafters = PolicyDrafters(4)
    for scope in ("union", "both"):
        policy = {**TREE, "store_scope": scope}
        for index, (ids, text) in enumerate(zip(prompts["a"], texts)):
            drafter = drafters.drafter(policy, store, text)
            left_out = union.arrays(exclude=text)
            assert len(left_out) == len(union.outputs) - 1 and store.outputs[index] not in left_out
            assert np.array_equal(drafter.union.tokens, SuffixStore.of(left_out, drafter.config).tokens)
            if scope == "both":
                assert np.array_equal(drafter.store.tokens, SuffixStore.of(store.arrays(exclude=text),
                                                                           drafter.config).tokens)
            real = generate(model, ids, GenerationConfig(max_new_tokens=TOKENS), drafter)
            assert counted(replay(drafter, workload.traces[index]).recorded().finish(0, 0.0)) == counted(real.stats)
        assert drafters.drafter(policy, store, "held out").union.arrays == len(union.outputs)
    with pytest.raises(KnnSsdError, match="carries no union"):
        drafters.drafter({**TREE, "store_scope": "union"}, replace(store, union_store=None), texts[0])


def test_the_search_suggests_store_scope_only_with_a_union_and_use_store():
    config = SearchConfig(kinds=("suffix_tree",))
    fixed = {"kind": "suffix_tree", "suffix_tree.max_ngram": 2, "suffix_tree.min_ngram": 1,
             "suffix_tree.max_occurrences": 4, "suffix_tree.max_depth": 4, "suffix_tree.max_tree_nodes": 4,
             "suffix_tree.min_path_prob": 0.1, "suffix_tree.spec_factor": 0.0, "suffix_tree.spec_offset": 0,
             "suffix_tree.recycled_k": 4, "suffix_tree.recycled_nodes": 0, "suffix_tree.store_scope": "both"}
    drafting = optuna.trial.FixedTrial({**fixed, "suffix_tree.use_store": True})
    assert suggest_policy(drafting, 4, config, has_store=True, has_union=True)["store_scope"] == "both"
    assert suggest_policy(drafting, 4, config, has_store=True, has_union=False)["store_scope"] == "own"
    plain = optuna.trial.FixedTrial({**fixed, "suffix_tree.use_store": False})
    assert suggest_policy(plain, 4, config, has_store=True, has_union=True)["store_scope"] == "own"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask({"kind": optuna.distributions.CategoricalDistribution(["suffix_tree"])})
        policy = suggest_policy(trial, 4, config, has_store=True, has_union=True)
        assert ("suffix_tree.store_scope" in trial.params) == policy["use_store"]
        seen.add(policy["store_scope"])
        study.tell(trial, 1.0)
    assert seen == {"own", "union", "both"}


def test_a_union_counts_only_where_it_holds_more_than_the_store():
    a = DomainStore(domain="a", prompts=("p", "q"), outputs=((1, 2, 3), (4, 5)))
    b = DomainStore(domain="b", prompts=("r",), outputs=((6, 7),))
    alone = replace(a, union_store=DomainStore.union([a], "mix"))  # one domain: the union is its own store
    assert not a.has_union and not alone.has_union and alone == a
    assert store_fingerprint(alone) == store_fingerprint(a)
    with_b = replace(a, union_store=DomainStore.union([a, b], "mix"))
    other = replace(a, union_store=DomainStore.union([a, replace(b, outputs=((6, 8),))], "mix"))
    assert with_b.has_union and with_b == a  # not part of equality ...
    assert len({store_fingerprint(a), store_fingerprint(with_b), store_fingerprint(other)}) == 3  # ... but of studies
    assert DomainStore.union([a, b], "mix").union_store is None


def test_the_runtime_gives_union_and_both_policies_the_union(loaded, outputs, tmp_path):  # noqa: F811
    """Each domain's store swapped for the other's: its own store holds nothing of its prompts, the union all of
    them. A union policy drafts from the union (one index shared by every domain), a both policy from both."""
    stores = {"low": join_store(outputs["high"]), "high": join_store(outputs["low"])}
    union_count = len(outputs["low"]) + len(outputs["high"])
    runtimes = {scope: load_bundle(str(store_bundle(loaded, tmp_path / scope, stores,
                                                    policy={**TREE, "store_scope": scope})), model=loaded)
                for scope in ("own", "union", "both")}
    low, high = runtimes["union"].drafters["low"], runtimes["union"].drafters["high"]
    assert low.store is None and low.union.arrays == union_count and low.union is high.union
    both = runtimes["both"].drafters["low"]
    assert both.store.arrays == len(outputs["high"]) and both.union.arrays == union_count
    assert runtimes["own"].drafters["low"].union is None
    for name in ("mix", "__fallback__"):  # the union whatever the scope
        drafter = runtimes["both"].reference_drafter() if name == "mix" else runtimes["both"].drafters[name]
        assert drafter.store.arrays == drafter.union.arrays == union_count
    prompt, expected = TINY_PROMPTS["low"][0], tuple(outputs["low"][0])
    accepted = {}
    for scope, runtime in runtimes.items():
        result = runtime.generate(prompt, NEW_TOKENS)
        assert result.route.domain == "low" and result.result.token_ids == expected, scope
        accepted[scope] = result.result.stats.accepted_tokens
    assert accepted["union"] > accepted["own"] and accepted["both"] > accepted["own"], accepted
