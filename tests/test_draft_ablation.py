"""benchmarks/draft_ablation.py end to end on the tests' tiny serving model and a tiny Spec-Bench-shaped JSONL
(one MT-bench category, merged into "chat", and one other): every policy is in the table, tokens per step are at
least 1, and `--check 1` (the real loop against replay) passes."""

from __future__ import annotations

import csv
import json

import pytest

from benchmarks.draft_ablation import BASE_POLICY, ablation_policies, main
from knnssd.errors import KnnSsdError
from tests.serving import save_serving_model


def write_jsonl(path, rows_per_domain: int = 8) -> None:
    """Two categories of prompts in the tiny word vocabulary (t0..t127), repetitive enough to draft from."""
    rows = []
    for i in range(rows_per_domain):
        rows.append({"category": "writing", "turns": [" ".join(f"t{3 + (i + j) % 20}" for j in range(10))]})
        rows.append({"category": "qa", "turns": [" ".join(f"t{100 + (i * 3 + j) % 27}" for j in range(10))]})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablation")
    model = save_serving_model(folder / "model")
    write_jsonl(folder / "question.jsonl")
    out = folder / "out"
    summary = main(["--model", str(model), "--data", str(folder / "question.jsonl"), "--store-prompts", "3",
                    "--held-out", "2", "--max-new-tokens", "12", "--store-tokens", "24", "--threads", "1",
                    "--check", "1", "--frontier", "2+1", "--out", str(out)])
    return summary, out


def test_every_policy_in_the_table_with_at_least_one_token_per_step(ablation):
    summary, out = ablation
    assert summary["domains"] == ["chat", "qa"]
    assert list(summary["policies"]) == list(ablation_policies(BASE_POLICY)) + ["frontier 2+1"]
    frontier = summary["policies"]["frontier 2+1"]
    assert frontier["policy"]["max_tree_nodes"] == 2 and frontier["policy"]["recycled_nodes"] == 1
    assert frontier["policy"]["store_scope"] == "both" and frontier["policy"]["use_warm"] is True
    assert 1.0 <= frontier["mean_width"] <= 4.0  # the last token + at most 2 matched + 1 recycled nodes
    assert summary["prompts"] == 4 and summary["checked_prompts"] == 1
    for name, row in summary["policies"].items():
        assert row["tokens_per_step"] >= 1.0, name
        assert row["mean_width"] >= 1.0 and 0.0 <= row["no_draft_share"] <= 1.0
        low, high = row["ci95"]
        assert low <= row["tokens_per_step"] <= high
        for domain in ("chat", "qa"):
            assert row["domains"][domain]["tokens_per_step"] >= 1.0
    assert summary["policies"]["prompt lookup"]["policy"]["kind"] == "prompt_lookup"
    with open(out / "per_prompt.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * len(summary["policies"])
    # each prompt commits its new tokens but the prefill's through verify steps, whatever the policy
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault((row["domain"], row["prompt"]), set()).add(int(row["tokens"]))
    assert all(tokens == {11} for tokens in by_prompt.values())
    assert json.loads((out / "summary.json").read_text())["policies"].keys() == summary["policies"].keys()


@pytest.mark.parametrize("budgets", ["0+4", "8+x", "16+16", "1+2+3", "-1"])
def test_frontier_refuses_a_budget_that_is_not_n_plus_r(budgets):
    from benchmarks.draft_ablation import frontier_policies

    with pytest.raises(KnnSsdError, match="--frontier"):
        frontier_policies(BASE_POLICY, budgets)


def test_base_must_be_a_suffix_tree():
    with pytest.raises(KnnSsdError, match="suffix_tree"):
        ablation_policies({"kind": "prompt_lookup"})


def test_check_refuses_a_replay_that_is_not_the_loops():
    """--check's comparison fails when the replayed events are not the loop's: here the replay of a recycling
    tree against the loop decoding plainly (no drafter: nothing accepted)."""
    import torch

    from benchmarks.draft_ablation import check_against_loop
    from knnssd.engine.policy import drafter_from_policy
    from pipeline.replay import replay
    from pipeline.traces import trace_prompt
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    ids = torch.tensor([[1] + [3 + (j % 7) for j in range(20)]])
    trace = trace_prompt(model, ids, 24)
    drafter = drafter_from_policy({**BASE_POLICY, "use_store": False, "recycled_nodes": 8}, 4)
    replayed = replay(drafter, trace)
    check_against_loop(model, ids, trace, drafter, replayed, "tree")  # the real pair agrees
    assert replayed.tally.accepted > 0  # else the plain loop below would agree too
    with pytest.raises(KnnSsdError, match="replay is not the loop"):
        check_against_loop(model, ids, trace, None, replayed, "tree")
