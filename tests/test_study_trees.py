"""The domain-shift study of a token-tree bundle: suffix-tree policies that draft from per-domain stores.

A tiny bundle whose "low" domain and mix reference draft token trees from stores (the model's own greedy
outputs), beside a prompt-lookup "high" domain, run end to end through jobs/evaluate.py with a named single-path
lookup and transformers' prompt lookup. Every count the study records is checked against the decoding loop run
independently with the drafter each method should use, so a method that dropped its store would fail here.
"""

from __future__ import annotations

import csv
import json

import pytest

from jobs.evaluate import main as evaluate_main
from knnssd.bundle import join_store
from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.policy import drafter_from_policy
from pipeline.data import DataConfig
from tests.bundles import TINY_PROMPTS, loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.test_heldout_integrity import calibration_record

NEW_TOKENS = 12
TREE = {"kind": "suffix_tree", "max_ngram": 2, "min_ngram": 1, "use_store": True}
POLICIES = {"low": TREE, "high": {"kind": "prompt_lookup", "max_ngram": 2, "min_ngram": 1, "max_draft_tokens": 4}}
LOOKUP = {"kind": "prompt_lookup", "max_ngram": 3, "min_ngram": 1, "max_draft_tokens": 5}


def ids_of(loaded, text):
    return loaded.tokenizer(text, return_tensors="pt")["input_ids"]  # the tiny bundle's prompt format: no chat


@pytest.fixture(scope="module")
def study(loaded, tmp_path_factory):
    """The stores (every prompt's greedy output, per domain), the bundle, and the job's output folder."""
    tmp = tmp_path_factory.mktemp("tree-study")
    outputs = {d: [generate(loaded.model, ids_of(loaded, t), GenerationConfig(max_new_tokens=NEW_TOKENS)).token_ids
                   for t in texts] for d, texts in TINY_PROMPTS.items()}
    data = tmp / "data.jsonl"
    data.write_text("\n".join(json.dumps({"domain": d, "prompt": t}) for d, ts in TINY_PROMPTS.items() for t in ts))
    calibration = calibration_record(DataConfig(path=str(data), held_out_fraction=0.34))  # with its fingerprint
    mix = {"policy": TREE, "metrics": {"speedup": 1.0}}
    folder = tiny_bundle(loaded, tmp / "bundle", calibration=calibration, reference_policies={"mix": mix},
                         policies=POLICIES, stores={d: join_store(o) for d, o in outputs.items()})
    out = tmp / "out"
    code = evaluate_main(["--bundle", str(folder), "--max-new-tokens", str(NEW_TOKENS), "--out", str(out),
                          "--no-log", "--streams", "task", "--peers", "hf-prompt-lookup",
                          "--policy", f"lookup={json.dumps(LOOKUP)}"])
    assert code == 0
    rows = list(csv.DictReader((out / "per_prompt.csv").open()))
    summary = {(r["method"], r["domain"]): r for r in csv.DictReader((out / "summary.csv").open())
               if r["stream"] == "task"}
    return outputs, rows, summary, folder, out


def expected_drafter(loaded, outputs, method, domain):
    """The drafter `method` must use on a prompt of `domain`: fix-<d> and the oracle (and KNN-SSD, which routes
    every tiny prompt right) with that domain's store, the mix with the union of every store, named policies
    with none."""
    layers = loaded.num_layers
    if method == "plain":
        return None
    if method == "lookup":
        return drafter_from_policy(LOOKUP, layers)
    if method == "mix":
        return drafter_from_policy(TREE, layers, store=[o for d in TINY_PROMPTS for o in outputs[d]])
    own = method[len("fix-"):] if method.startswith("fix-") else domain
    return drafter_from_policy(POLICIES[own], layers, store=outputs[own])


def held_out(folder):
    """The task stream's (domain, text) in its order, rebuilt as the job rebuilds them from the manifest."""
    from jobs.evaluate import evaluation_prompts
    from pipeline.study import stream_order

    prompts, _ = evaluation_prompts(json.loads((folder / "manifest.json").read_text()), None, None)
    return stream_order(prompts, "task", 0)


def counts(stats):
    return (stats.accepted_tokens, stats.drafted_tokens, stats.verify_steps, stats.tree_steps,
            stats.verify_widths[0] if stats.verify_widths else 0)


def row_counts(row):
    return tuple(int(row[k]) for k in ("accepted", "drafted", "steps", "tree_steps", "no_draft_steps"))


def test_every_count_is_the_loops_with_the_drafter_the_method_names(loaded, study):
    outputs, rows, _, folder, _ = study
    assert {r["method"] for r in rows} == {"plain", "fix-low", "fix-high", "mix", "knn", "oracle", "lookup",
                                           "hf-plain", "hf-prompt-lookup"}
    ours = [r for r in rows if not r["method"].startswith("hf-")]
    assert all(r["identical"] == "True" for r in ours)
    assert all(r["routed_to"] == r["domain"] for r in rows if r["method"] == "knn")
    prompts = held_out(folder)
    assert len(prompts) == 4 and len(ours) == 4 * 7
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    for row in ours:
        domain, text = prompts[int(row["order"])]
        assert domain == row["domain"]
        drafter = expected_drafter(loaded, outputs, row["method"], domain)
        expected = counts(generate(loaded.model, ids_of(loaded, text), config, drafter).stats)
        assert row_counts(row) == expected, row
    # the test can fail: without its store, the tree policy drafts otherwise on these prompts
    bare = drafter_from_policy({**TREE, "use_store": False}, loaded.num_layers)
    fix_low = [r for r in ours if r["method"] == "fix-low"]
    assert any(counts(generate(loaded.model, ids_of(loaded, prompts[int(r["order"])][1]), config, bare).stats)
               != row_counts(r) for r in fix_low)
    assert sum(int(r["tree_steps"]) for r in fix_low + [r for r in ours if r["method"] == "mix"]) > 0


def test_summary_gives_mean_accepted_and_the_verify_width_used(loaded, study):
    """Per method and domain: mean accepted tokens and mean verify width as the loop's own statistics give them
    (pooled over the domain's prompts), width 1 for plain decoding, none for transformers' peers."""
    outputs, rows, summary, folder, _ = study
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    prompts = held_out(folder)
    for method in ("plain", "fix-low", "fix-high", "mix", "knn", "oracle", "lookup"):
        for domain in ("low", "high", "overall"):
            runs = [generate(loaded.model, ids_of(loaded, text), config,
                             expected_drafter(loaded, outputs, method, d)).stats
                    for d, text in prompts if domain in (d, "overall")]
            steps = sum(s.verify_steps for s in runs)
            accepted = sum(s.accepted_tokens for s in runs)
            passes = sum(count for s in runs for count in s.verify_widths)  # the loop's histogram of widths
            width = sum((w + 1) * count for s in runs for w, count in enumerate(s.verify_widths)) / passes
            cell = summary[(method, domain)]
            assert passes == steps
            assert float(cell["mean_accepted"]) == pytest.approx((accepted + steps) / steps)
            assert float(cell["mean_verify_width"]) == pytest.approx(width)
            assert float(cell["mean_verify_width"]) == 1.0 if method == "plain" else float(cell["mean_verify_width"]) >= 1.0
    assert float(summary[("fix-low", "low")]["mean_verify_width"]) > 1.0
    assert float(summary[("hf-prompt-lookup", "overall")]["mean_verify_width"]) == 0.0


def test_report_shows_the_acceptance_table_and_the_verdicts_against_lookup_and_mix(study):
    _, _, summary, _, out = study
    report = (out / "report.txt").read_text()
    assert "mean accepted tokens per verify step / mean verify width, task stream:" in report
    table = report.split("mean verify width, task stream:\n")[1].split("\n\n")[0].splitlines()
    fix_low = next(line for line in table if line.startswith("fix-low ")).split()
    cell = summary[("fix-low", "low")]
    assert fix_low[1] == f"{float(cell['mean_accepted']):.2f}/{float(cell['mean_verify_width']):.2f}"
    overall = next(line for line in report.splitlines() if line.startswith("task stream, overall (4 prompts)"))
    for judged in ("Self-SD(Fix)", "Self-SD(Mix)", '"lookup"', '"hf-prompt-lookup"'):
        assert f"too few prompts to compare with {judged}" in overall  # 4 prompts: intervals, no verdicts
    assert "lossless: every method of ours token-identical" in report
    tables = (out / "tables.md").read_text()
    assert f"| fix-low | {fix_low[1].replace('/', ' / ')} |" in tables
    assert '| vs Self-SD(Mix) | vs "lookup" | vs "hf-prompt-lookup" |' in tables
