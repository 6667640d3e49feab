"""Suffix-tree policies in calibration: a store-drafting trial on prompt p never sees p's own output
(`pipeline.drafting`), in the priced replay and in wall clock, and a tree pass is priced at its width."""

from __future__ import annotations

import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import SuffixTreeConfig, SuffixTreeDrafter
from knnssd.errors import KnnSsdError
from pipeline.drafting import PolicyDrafters
from pipeline.measure import measure_policies
from pipeline.replay import Replayed, Step, Trace, replay, trace_prompt
from pipeline.scoring import build_workload, score_policy
from pipeline.stores import DomainStore
from tests.conftest import tiny_model
from tests.test_calibrate_job import tiny  # noqa: F401 - the saved tiny model and its data
from tests.test_replay import costs

POLICY = {"kind": "suffix_tree", "use_store": True, "max_ngram": 2, "min_path_prob": 0.02}
TEXTS = ("prompt zero", "prompt one", "prompt two")
TOKENS = 24


@pytest.fixture(scope="module")
def setup():
    """A tiny model, three prompts, and the store of its greedy outputs of them (each output's own prompt is
    in the store: the case where leaving it out matters)."""
    model = tiny_model("llama")
    ids = [torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(100 + seed)) for seed in range(3)]
    outputs = tuple(generate(model, i, GenerationConfig(max_new_tokens=TOKENS)).token_ids for i in ids)
    return model, ids, DomainStore("d", TEXTS, outputs)


def test_a_prompt_drafts_from_the_store_without_its_own_output(setup):
    model, ids, store = setup
    drafters = PolicyDrafters(num_layers=4)
    config = SuffixTreeConfig(max_ngram=2, min_path_prob=0.02, use_store=True)
    for index, text in enumerate(TEXTS):
        drafter = drafters.drafter(POLICY, store, text)
        others = [o for j, o in enumerate(store.outputs) if j != index]
        assert drafter.store.arrays == 2
        assert drafter.store.tokens.tolist() == SuffixTreeDrafter.with_store(others, config).store.tokens.tolist()
        trace = trace_prompt(model, ids[index], TOKENS)
        left_out = replay(drafter, trace)
        assert left_out == replay(SuffixTreeDrafter.with_store(others, config), trace)
        own_future = replay(SuffixTreeDrafter.with_store(store.outputs, config), trace)
        assert own_future.tally.accepted > left_out.tally.accepted  # what the exclusion keeps out
    held_out = drafters.drafter(POLICY, store, "a held-out prompt")
    assert held_out.store.arrays == 3  # a prompt in no store drafts from all of it
    first, again = (drafters.drafter(POLICY, store, TEXTS[0]) for _ in range(2))
    assert first.store is again.store  # indexed once


def test_store_policies_need_a_store_and_the_prompts_text(setup):
    _, _, store = setup
    drafters = PolicyDrafters(num_layers=4)
    with pytest.raises(KnnSsdError, match="its domain has none"):
        drafters.drafter(POLICY, None, TEXTS[0])
    with pytest.raises(KnnSsdError, match="text is unknown"):
        drafters.drafter(POLICY, store, None)
    assert drafters.drafter({**POLICY, "use_store": False}, None).store is None


def test_a_trial_score_leaves_each_prompts_own_output_out(setup):
    """The priced replay of a store-drafting policy on calibration prompts equals pricing each prompt with the
    store of the others, and scores below what reading its own future would."""
    model, ids, store = setup
    workload = build_workload(model, ids, TOKENS, TEXTS)
    table = costs(verify=(0.05, 0.051, 0.052), draft=0.0)
    scored = score_policy(model, POLICY, 4, workload, table, store)
    config = SuffixTreeConfig(max_ngram=2, min_path_prob=0.02, use_store=True)
    expected = plain = 0.0
    for index, trace in enumerate(workload.traces):
        others = [o for j, o in enumerate(store.outputs) if j != index]
        expected += table.generation_seconds(trace, replay(SuffixTreeDrafter.with_store(others, config), trace), None)
        plain += table.plain_seconds(trace)
    assert scored.predicted_speedup == pytest.approx(plain / expected)
    peeking = build_workload(model, ids, TOKENS)  # texts unknown: refused, rather than drafting from everything
    with pytest.raises(KnnSsdError, match="text is unknown"):
        score_policy(model, POLICY, 4, peeking, table, store)


def test_wall_clock_measurement_leaves_each_prompts_own_output_out(setup):
    model, ids, store = setup
    config = SuffixTreeConfig(max_ngram=2, min_path_prob=0.02, use_store=True)
    measured = measure_policies(model, {"tree": POLICY}, ids, TOKENS, 4, stores={"tree": store}, texts=list(TEXTS))
    accepted = sum(generate(model, i, GenerationConfig(max_new_tokens=TOKENS), SuffixTreeDrafter.with_store(
        [o for j, o in enumerate(store.outputs) if j != index], config)).stats.accepted_tokens
        for index, i in enumerate(ids))
    steps = sum(generate(model, i, GenerationConfig(max_new_tokens=TOKENS), SuffixTreeDrafter.with_store(
        [o for j, o in enumerate(store.outputs) if j != index], config)).stats.verify_steps
        for index, i in enumerate(ids))
    assert measured.policies["tree"].mean_accepted_tokens == pytest.approx((accepted + steps) / steps)
    assert measured.policies["tree"].mismatch_rate == 0.0


def test_a_tree_pass_is_priced_at_its_width():
    table = costs()
    trace = Trace(prompt=tuple(range(16)), tokens=(1, 2, 3, 4, 5), max_new_tokens=5, prefill_seconds=0.0, seconds=0.0)
    tree = Replayed(steps=(Step(drafted=3, accepted=2, forwards=0, by_depth=(2, 1)), Step(drafted=0, accepted=0,
                                                                                        forwards=0)))
    assert tree.steps[0].width == 4
    expected = table.prefill_seconds(16) + table.verify_seconds(4, 16) + table.verify_seconds(1, 19)
    assert table.generation_seconds(trace, tree, None) == pytest.approx(expected)


def test_calibration_searches_and_validates_store_drafting_trees_on_ray(tmp_path, tiny):  # noqa: F811
    """run_searches with a store: suffix-tree trials draft from it (use_store suggested both ways) and finish;
    run_validation measures two domains' equal store-drafting policies as two policies, each with its store."""
    import ray

    from pipeline.calibrate import CalibrationConfig, identify, run_searches, run_validation
    from pipeline.data import CALIBRATION, DataConfig, load_calibration_table, prompts_of
    from pipeline.search import make_storage
    from pipeline.space import SearchConfig
    from pipeline.tasks import ModelSpec

    spec = ModelSpec(name=str(tiny / "model"), chat=False, threads=1)
    config = CalibrationConfig(model=spec, bundle_name="t", data=DataConfig(path=str(tiny / "data.jsonl")),
                               search=SearchConfig(trials=8, prompts_per_trial=2, max_new_tokens=8, confirm_prompts=2,
                                                   confirm_rounds=1, kinds=("prompt_lookup", "suffix_tree")),
                               work_dir=str(tmp_path / "w"), mix=False, validate_prompts=1)
    table = load_calibration_table(config.data, min_calibration=2)
    loaded = spec.load()
    stores = {}
    for domain in ("low", "high"):
        texts = prompts_of(table, domain, CALIBRATION)
        outputs = tuple(generate(loaded.model, loaded.tokenizer(t, return_tensors="pt").input_ids,
                                 GenerationConfig(max_new_tokens=8)).token_ids for t in texts)
        stores[domain] = DomainStore(domain, tuple(texts), outputs)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        model = identify(config, print)
        results = run_searches(config, table, model, print, stores={"low": stores["low"]})  # "high": no store
        policy = {"kind": "suffix_tree", "use_store": True}
        validation = run_validation(config, table, {"low": policy, "high": policy}, print, stores)
    finally:
        ray.shutdown()
    import optuna

    trials = {r["domain"]: optuna.load_study(study_name=r["study"], storage=make_storage(config.storage_url)).trials
              for r in results}
    used = {domain: {t.user_attrs["policy"].get("use_store") for t in found
                     if t.user_attrs.get("policy", {}).get("kind") == "suffix_tree"}
            for domain, found in trials.items()}
    assert used == {"low": {False, True}, "high": {False}}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for found in trials.values() for t in found)
    assert set(validation["policies"]) == {"low", "high"}  # not merged: each drafts from its own store
    assert all(row["mismatch_rate"] == 0.0 for row in validation["domains"].values())
