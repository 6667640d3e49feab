"""benchmarks/prompts_ablation.py's core on a tiny random Llama with 2 domains of synthetic prompts, 2 settings of
prompts per trial and a few trials: the summary's structure, the paired difference, and the chosen policies'
held-out figures against an independent replay (the runtime's drafter on the whole store, and `score_policy`)."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pytest
import torch

from benchmarks.draft_ablation import build_stores, build_traces, check_held_out
from benchmarks.prompts_ablation import (HELD_OUT, HELD_OUT_SHORT, IN_SAMPLE, OVERALL, ablate, build_parser,
                                         check_args, parse_settings, summarise, with_union, write_outputs)
from knnssd.engine.drafters import SuffixStore
from knnssd.engine.policy import drafter_from_policy, suffix_tree_config
from knnssd.errors import KnnSsdError
from pipeline.costs import StepCosts
from pipeline.data import CALIBRATION, HELD_OUT as HELD_OUT_SPLIT
from pipeline.replay import full_cache, predict, replay
from pipeline.scoring import policy_skip_set, score_policy, workload_of
from pipeline.traces import trace_prompt
from tests.conftest import tiny_model

DOMAINS = ("alpha", "beta")
SETTINGS = (2, 4)
LAYERS = 4
HELD, HELD_TOKENS, SEARCH_TOKENS, TRIALS = 2, 14, 8, 12


def synthetic_table() -> pa.Table:
    """Per domain 5 calibration and 2 held-out prompts of repeating token ids (text: the ids)."""
    domains, prompts, splits = [], [], []
    for d, (base, period) in enumerate(((3, 7), (60, 9))):
        for i in range(7):
            ids = [base + (i + j) % period + (j % 3) * 10 for j in range(18)]
            domains.append(DOMAINS[d])
            prompts.append(" ".join(map(str, ids)))
            splits.append(CALIBRATION if i < 5 else HELD_OUT_SPLIT)
    return pa.table({"domain": domains, "prompt": prompts, "split": splits})


def encode(text: str) -> torch.Tensor:
    return torch.tensor([[1] + [int(t) for t in text.split()]])


def step_costs() -> StepCosts:
    verify = (0.010, 0.011, 0.012, 0.014, 0.018, 0.026)
    return StepCosts(contexts=(16, 512), widths=(1, 2, 4, 8, 16, 32), verify=(verify, tuple(v * 1.2 for v in verify)),
                     draft_forward=(0.008, 0.009), attention=0.001, mlp=0.001, threads=1, device="cpu",
                     prefill=(0.02, 0.2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on 2 busy cores: several threads only wait on each other
    try:
        yield build_and_run(tmp_path_factory)
    finally:
        torch.set_num_threads(before)


def build_and_run(tmp_path_factory):
    model = tiny_model("llama", num_layers=LAYERS)
    table = synthetic_table()
    stores = with_union(build_stores(model, encode, table, list(DOMAINS), 4, 24, 4, False))
    traces = build_traces(model, encode, table, list(DOMAINS), HELD, HELD_TOKENS, 4, False)
    check_held_out(stores, traces)
    costs = step_costs()
    lines: list[str] = []
    ablation = ablate(model, LAYERS, encode, stores, traces, costs, SETTINGS, trials=TRIALS,
                      search_tokens=SEARCH_TOKENS, log=lines.append)
    summary = {"model": "tiny", "domains": list(DOMAINS), "held_out_per_domain": HELD, "max_new_tokens": HELD_TOKENS,
               "trials": TRIALS, "costs": {"source": "test table"}, **summarise(ablation, DOMAINS, SETTINGS, seed=0)}
    out = tmp_path_factory.mktemp("prompts-ablation")
    write_outputs(out, summary, ablation.rows)
    return model, stores, traces, costs, ablation, summary, lines, out


def test_every_setting_and_domain_is_searched_and_summarised(run):
    _, _, _, _, ablation, summary, lines, out = run
    assert len(lines) == len(SETTINGS) * len(DOMAINS) and all(line.startswith("study ") for line in lines)
    assert [(s.setting, s.domain) for s in ablation.studies] == [(s, d) for d in DOMAINS for s in SETTINGS]
    assert all(s.completed == TRIALS and s.prompts == s.setting for s in ablation.studies)
    assert list(summary["settings"]) == ["2", "4"] and list(summary["differences"]) == ["4-2"]
    for setting in SETTINGS:
        per = summary["settings"][str(setting)]
        assert set(per) == {*DOMAINS, OVERALL}
        for name in (*DOMAINS, OVERALL):
            row = per[name]
            prompts = len(DOMAINS) if name == OVERALL else 1
            assert row[IN_SAMPLE]["prompts"] == setting * prompts and row[HELD_OUT]["prompts"] == HELD * prompts
            for split in (IN_SAMPLE, HELD_OUT, HELD_OUT_SHORT):
                figures = row[split]
                assert figures["tokens_per_step"] >= 1.0 and figures["speedup"] > 0
                low, high = figures["speedup_ci95"]
                assert low <= figures["speedup"] <= high
            assert row["gap"]["speedup"] == pytest.approx(row[IN_SAMPLE]["speedup"] - row[HELD_OUT_SHORT]["speedup"])
        for domain in DOMAINS:  # the in-sample figure is the best trial's value
            assert per[domain][IN_SAMPLE]["speedup"] == pytest.approx(per[domain]["best_value"], rel=1e-12)
    for name in (*DOMAINS, OVERALL):
        diff = summary["differences"]["4-2"][name]
        expected = (summary["settings"]["4"][name][HELD_OUT]["speedup"]
                    - summary["settings"]["2"][name][HELD_OUT]["speedup"])
        assert diff["speedup"] == pytest.approx(expected)
        assert diff["speedup_ci95"][0] <= diff["speedup"] + 1e-12 and diff["speedup"] <= diff["speedup_ci95"][1] + 1e-12
    with open(out / "per_prompt.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(DOMAINS) * (s + 2 * HELD) for s in SETTINGS)
    assert {r["split"] for r in rows} == {IN_SAMPLE, HELD_OUT, HELD_OUT_SHORT}
    assert json.loads((out / "summary.json").read_text())["differences"].keys() == summary["differences"].keys()


def test_held_out_figures_are_an_independent_replay_of_the_chosen_policy(run):
    """Each held-out row (at the held-out length, and at the search's from a plain decoding of that length) equals
    the chosen policy replayed as the runtime drafts (the whole store and the union, indexed here, the warm table
    of the whole store) and scored alone by `score_policy`."""
    model, stores, traces, costs, ablation, summary, _, _ = run
    union = next(iter(stores.values())).union_store
    short = {d: [trace_prompt(model, ids, SEARCH_TOKENS) for _, ids, _ in traces[d]] for d in DOMAINS}
    checked = 0
    for setting in SETTINGS:
        for domain in DOMAINS:
            policy = summary["settings"][str(setting)][domain]["policy"]
            store = stores[domain]
            indexed = {}
            if policy["kind"] == "suffix_tree":
                config = suffix_tree_config(policy)
                indexed = {"store": SuffixStore.of(store.arrays(), config), "successors": store.table(),
                           "union_store": SuffixStore.of(union.arrays(), config)}
            drafter = drafter_from_policy(policy, LAYERS, **indexed)
            skip = policy_skip_set(policy)
            for split, held in ((HELD_OUT, [t for _, _, t in traces[domain]]), (HELD_OUT_SHORT, short[domain])):
                rows = sorted((r for r in ablation.rows if r.setting == setting and r.split == split
                               and r.result.domain == domain), key=lambda r: r.result.prompt)
                assert len(rows) == HELD
                for row, (text, _, _), trace in zip(rows, traces[domain], held):
                    prediction = predict(model, trace, full_cache(model, trace), skip) if skip is not None else None
                    tally = replay(drafter, trace, prediction).tally
                    assert (row.result.steps, row.result.tokens) == (tally.steps, tally.accepted + tally.steps)
                    alone = score_policy(model, policy, LAYERS, workload_of(model, [trace], [text]), costs, store)
                    assert row.plain_seconds == pytest.approx(alone.plain_seconds, rel=1e-12)
                    assert row.seconds == pytest.approx(alone.seconds, rel=1e-12)
                    checked += 1
    assert checked == len(SETTINGS) * len(DOMAINS) * HELD * 2


def test_settings_and_flags_are_checked():
    assert parse_settings("4,16") == (4, 16)
    for bad in ("4", "4,4", "0,4", "a,b"):
        with pytest.raises(KnnSsdError, match="--settings"):
            parse_settings(bad)
    with pytest.raises(KnnSsdError, match="more than --store-prompts"):
        check_args(build_parser().parse_args(["--settings", "4,16", "--store-prompts", "8"]))
    with pytest.raises(KnnSsdError, match="--search-tokens"):
        check_args(build_parser().parse_args(["--search-tokens", "96"]))
