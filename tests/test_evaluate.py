"""The domain-shift evaluation: its figures on synthetic runs, and jobs/evaluate.py end to end on a tiny model."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict

import pytest

from jobs.evaluate import main as evaluate_main
from pipeline.data import DataConfig
from pipeline.report import PromptRun, summarise, verdicts
from pipeline.study import EvalConfig, stream_order
from tests.bundles import TINY_PROMPTS, loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.test_heldout_integrity import calibration_record


def run(method, domain, seconds, plain, stream="task", accepted=0, drafted=0, steps=1, identical=True, routed="",
        order=None, prefill=None, plain_prefill=None):
    order = {"a": 0, "b": 1}.get(domain, 0) if order is None else order
    return PromptRun(stream=stream, order=order, domain=domain, method=method, seconds=seconds, plain_seconds=plain,
                     new_tokens=8, accepted=accepted, drafted=drafted, steps=steps, identical=identical,
                     routed_to=routed, prefill_seconds=prefill, plain_prefill_seconds=plain_prefill)


def test_figures_are_pooled_ratios():
    rows = [run("plain", "a", 2.0, 2.0), run("plain", "b", 4.0, 4.0),
            run("knn", "a", 1.0, 2.0, accepted=3, drafted=4, steps=2, routed="a"),
            run("knn", "b", 4.0, 4.0, accepted=0, drafted=2, steps=2, routed="a"),
            run("fix-a", "a", 1.0, 2.0), run("fix-a", "b", 8.0, 4.0, identical=False)]
    table = {(r["method"], r["domain"]): r for r in summarise(rows)}
    assert table[("plain", "overall")]["speedup"] == 1.0
    assert table[("knn", "a")]["speedup"] == 2.0
    assert table[("knn", "overall")]["speedup"] == pytest.approx(6.0 / 5.0)  # pooled seconds, not mean of ratios
    assert table[("knn", "overall")]["mean_accepted"] == pytest.approx((3 + 4) / 4)
    assert table[("knn", "overall")]["acceptance"] == pytest.approx(3 / 6)
    assert table[("knn", "overall")]["routing_accuracy"] == 0.5
    assert table[("fix-a", "overall")]["identical"] == 0.5
    assert table[("knn", "a")]["speedup_low"] == table[("knn", "a")]["speedup_high"] == 2.0  # one prompt
    # one prompt per domain: a difference of 1.0 - 0.5 on b has a zero-width interval (nothing to resample), but
    # one or two prompts are too few for any verdict (pipeline.bootstrap.MIN_VERDICT_PROMPTS)
    lines = verdicts(rows)
    assert any(line.startswith("task stream, b (1 prompts): KNN-SSD 1.000") and
               "too few prompts to compare with Self-SD(Fix) on average (speedup difference +0.500" in line
               for line in lines), lines
    assert all("too few prompts to compare with Self-SD(Fix)" in line and "beats" not in line for line in lines)


def test_the_decoding_phase_speedup_takes_each_runs_prefill_out(tmp_path):
    """Prompt a: plain 3.0 s of which 1.0 prefill, knn 2.0 s of which 1.0: 1.5x overall, 2.0x decoding. Prompt b:
    plain 5.0 (1.0), knn 3.0 (1.0): 5/3 and 2.0. Pooled: 8/5 overall, (2 + 4) / (1 + 2) = 2.0 decoding; plain's
    prefill share 2/8. A transformers peer has no prefill seconds: NaN, and no row in the phase's table."""
    from pipeline.report import read_rows, write_outputs
    from pipeline.text_tables import format_decode

    rows = [run("plain", "a", 3.0, 3.0, prefill=1.0, plain_prefill=1.0),
            run("knn", "a", 2.0, 3.0, prefill=1.0, plain_prefill=1.0),
            run("plain", "b", 5.0, 5.0, prefill=1.0, plain_prefill=1.0),
            run("knn", "b", 3.0, 5.0, prefill=1.0, plain_prefill=1.0),
            run("hf-plain", "a", 6.0, 3.0, plain_prefill=1.0), run("hf-plain", "b", 9.0, 5.0, plain_prefill=1.0)]
    table = {(r["method"], r["domain"]): r for r in summarise(rows)}
    assert table[("knn", "overall")]["speedup"] == pytest.approx(8 / 5)
    assert table[("knn", "overall")]["decode_speedup"] == pytest.approx(2.0)
    assert table[("knn", "a")]["decode_speedup"] == pytest.approx(2.0)
    assert table[("plain", "overall")]["prefill_share"] == pytest.approx(2 / 8)
    assert table[("hf-plain", "overall")]["decode_speedup"] != table[("hf-plain", "overall")]["decode_speedup"]
    text = format_decode(summarise(rows), "task")
    assert "hf-plain" not in text and text.splitlines()[-1].split()[-1] == "25%"
    write_outputs(rows, summarise(rows), tmp_path, "t")
    assert read_rows(tmp_path / "per_prompt.csv") == rows  # the prefill columns survive a rerender
    assert "| **knn** | **2.00 [2.00, 2.00]** | **2.00 [2.00, 2.00]** | **2.00 [2.00, 2.00]** |" in (
        tmp_path / "tables.md").read_text()
    assert "the decoding phase alone" in (tmp_path / "report.txt").read_text()


def test_verdicts_need_an_interval_that_excludes_zero():
    """Twelve prompts where KNN-SSD is 1.5x faster than the fixed policy on each: significant. The same with
    the two alternating faster and slower: no significant difference."""
    clear, mixed = [], []
    for i in range(12):
        clear += [run("plain", "a", 2.0, 2.0, order=i), run("knn", "a", 1.0, 2.0, order=i),
                  run("fix-a", "a", 1.5, 2.0, order=i)]
        knn, fix = (1.0, 1.5) if i % 2 else (1.5, 1.0)
        mixed += [run("plain", "a", 2.0, 2.0, order=i), run("knn", "a", knn, 2.0, order=i),
                  run("fix-a", "a", fix, 2.0, order=i)]
    assert "beats Self-SD(Fix) on average" in verdicts(clear)[0]
    assert "no significant difference from Self-SD(Fix)" in verdicts(mixed)[0]


def test_streams_hold_the_same_prompts_in_different_orders():
    prompts = [("a", "1"), ("b", "2"), ("a", "3"), ("b", "4"), ("c", "5")]
    task = stream_order(prompts, "task", 0)
    assert [d for d, _ in task] == ["a", "a", "b", "b", "c"]
    mixed = stream_order(prompts, "mixed", 0)
    assert sorted(mixed) == sorted(prompts) and mixed != task


@pytest.mark.parametrize("kwargs, words", [({"streams": ("both",)}, "unknown stream"),
                                           ({"peers": ("vllm",)}, "unknown peer"),
                                           ({"max_new_tokens": 0}, ">= 1"),
                                           ({"policies": (("knn", {"kind": "none"}),)}, "taken by a built-in"),
                                           ({"policies": (("a b", {"kind": "none"}),)}, "characters")])
def test_bad_config(kwargs, words):
    from knnssd.errors import KnnSsdError

    with pytest.raises(KnnSsdError, match=words):
        EvalConfig(**kwargs)


@pytest.fixture()
def evaluated(loaded, tmp_path):
    """A tiny bundle (layer-skip policies per domain, a prompt-lookup 'mix') calibrated on a JSONL whose held-out
    split the job rebuilds; the job run end to end without MLflow."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"domain": d, "prompt": t}) for d, ts in TINY_PROMPTS.items() for t in ts))
    mix = {"policy": {"kind": "prompt_lookup", "max_ngram": 2, "min_ngram": 1, "max_draft_tokens": 5},
           "metrics": {"speedup": 1.0}}
    calibration = calibration_record(DataConfig(path=str(data), held_out_fraction=0.34))  # with its fingerprint
    folder = tiny_bundle(loaded, tmp_path / "bundle", calibration=calibration, reference_policies={"mix": mix})
    out = tmp_path / "out"
    code = evaluate_main(["--bundle", str(folder), "--max-new-tokens", "12", "--out", str(out), "--no-log",
                          "--early-exit-layer", "2", "--peers", "hf-prompt-lookup,hf-early-exit",
                          "--policy", 'lookup-alone={"kind": "prompt_lookup"}'])
    assert code == 0
    return out


def test_job_runs_every_method_on_held_out_prompts_losslessly(evaluated):
    rows = list(csv.DictReader((evaluated / "per_prompt.csv").open()))
    methods = {r["method"] for r in rows}
    assert methods == {"plain", "fix-low", "fix-high", "mix", "knn", "oracle", "lookup-alone", "hf-plain",
                       "hf-prompt-lookup", "hf-early-exit"}
    assert {r["stream"] for r in rows} == {"task", "mixed"}
    per_stream = [r for r in rows if r["stream"] == "task" and r["method"] == "plain"]
    assert len(per_stream) == 4  # 2 held out of 6 per domain (fraction 0.34), 2 domains
    held_out = {r["domain"] for r in per_stream}
    assert held_out == {"low", "high"}
    ours = [r for r in rows if not r["method"].startswith("hf-")]
    assert all(r["identical"] == "True" for r in ours)
    drafted = {r["method"]: int(r["drafted"]) for r in ours if int(r["drafted"])}
    assert {"fix-low", "fix-high", "knn", "oracle"} <= set(drafted)  # the drafters really drafted
    knn = [r for r in rows if r["method"] == "knn"]
    assert sum(r["routed_to"] == r["domain"] for r in knn) == len(knn)  # two clearly different vocabularies
    report = (evaluated / "report.txt").read_text()
    assert "lossless: every method of ours token-identical" in report
    assert "task stream, overall (4 prompts): KNN-SSD" in report and "Self-SD(Mix)" in report
    assert all(float(r["prefill_seconds"]) > 0 and float(r["plain_prefill_seconds"]) > 0 for r in ours)
    assert all(r["prefill_seconds"] == "" for r in rows if r["method"].startswith("hf-"))
    assert "the decoding phase alone" in report
    assert (evaluated / "speedup.png").stat().st_size > 10_000


def test_rerender_rebuilds_the_report_from_the_per_prompt_table(evaluated, capsys):
    before = (evaluated / "summary.csv").read_text()
    (evaluated / "summary.csv").unlink()
    assert evaluate_main(["--rerender", str(evaluated)]) == 0  # no bundle needed: nothing is measured
    assert (evaluated / "summary.csv").read_text() == before
    assert "task stream, overall" in capsys.readouterr().out


def test_rerender_of_a_folder_without_a_run_and_a_study_without_a_bundle_are_refused(tmp_path, capsys):
    assert evaluate_main(["--rerender", str(tmp_path)]) == 2
    assert "per_prompt.csv does not exist" in capsys.readouterr().err
    assert evaluate_main(["--no-log"]) == 2
    assert "no bundle to evaluate" in capsys.readouterr().err


def test_missing_data_is_refused(loaded, tmp_path, capsys):
    folder = tiny_bundle(loaded, tmp_path / "bundle")
    code = evaluate_main(["--bundle", str(folder), "--data", str(tmp_path / "none.jsonl"), "--no-log"])
    assert code == 2 and "none.jsonl" in capsys.readouterr().err


def test_the_out_of_distribution_stream_reports_fallbacks_and_routing():
    from pipeline.report import out_of_distribution

    rows = [run("plain", "rag", 2.0, 2.0, stream="ood", order=0),
            run("knn", "rag", 2.0, 2.0, stream="ood", order=0, routed="(fallback)"),
            run("plain", "rag", 2.0, 2.0, stream="ood", order=1),
            run("knn", "rag", 1.0, 2.0, stream="ood", order=1, routed="qa")]
    (line,) = out_of_distribution(rows)
    assert line.startswith("ood stream, rag (never calibrated, 2 prompts): fallback 1/2 (50%)")
    assert "routed to (fallback) 1, qa 1" in line and "KNN-SSD 1.333" in line


def test_out_of_distribution_domains_must_be_unseen_and_present():
    import pyarrow as pa

    from knnssd.errors import KnnSsdError
    from pipeline.study import ood_prompts

    table = pa.table({"domain": ["a", "a", "rag", "rag", "rag"], "prompt": ["1", "2", "3", "4", "5"],
                      "split": ["calibration", "held_out", "calibration", "held_out", "calibration"]})
    assert ood_prompts(table, ["a"], ("rag",), 2) == [("rag", "3"), ("rag", "4")]
    with pytest.raises(KnnSsdError, match="are calibrated"):
        ood_prompts(table, ["a"], ("a",), 2)
    with pytest.raises(KnnSsdError, match="not in the data"):
        ood_prompts(table, ["a"], ("code",), 2)


def test_verify_width_and_tree_share_are_pooled_per_method():
    """Plain verifies one token a step; a tree method's width is (drafted + steps) / steps, pooled over prompts;
    transformers' peers have no loop counts (0, shown as '-')."""
    from pipeline.text_tables import format_acceptance

    rows = [run("plain", "a", 2.0, 2.0, steps=8), run("plain", "b", 2.0, 2.0, steps=8),
            run("tree", "a", 1.0, 2.0, accepted=6, drafted=20, steps=2),
            run("tree", "b", 1.0, 2.0, accepted=2, drafted=10, steps=6),
            run("hf-prompt-lookup", "a", 1.0, 2.0, steps=0), run("hf-prompt-lookup", "b", 1.0, 2.0, steps=0)]
    rows[2] = PromptRun(**{**asdict(rows[2]), "tree_steps": 2, "no_draft_steps": 0})
    rows[3] = PromptRun(**{**asdict(rows[3]), "tree_steps": 1, "no_draft_steps": 3})
    rows[:2] = [PromptRun(**{**asdict(r), "no_draft_steps": 8}) for r in rows[:2]]
    table = {(r["method"], r["domain"]): r for r in summarise(rows)}
    assert table[("plain", "a")]["mean_verify_width"] == table[("plain", "overall")]["mean_verify_width"] == 1.0
    assert table[("plain", "overall")]["mean_accepted"] == 1.0 and table[("plain", "a")]["tree_share"] == 0.0
    assert table[("tree", "a")]["mean_verify_width"] == pytest.approx((20 + 2) / 2)
    assert table[("tree", "overall")]["mean_verify_width"] == pytest.approx((30 + 8) / 8)
    assert table[("tree", "overall")]["mean_accepted"] == pytest.approx((8 + 8) / 8)
    assert table[("tree", "overall")]["tree_share"] == pytest.approx(3 / 8)
    assert table[("tree", "overall")]["no_draft_share"] == pytest.approx(3 / 8)
    assert table[("tree", "a")]["no_draft_share"] == 0.0 and table[("plain", "overall")]["no_draft_share"] == 1.0
    assert table[("hf-prompt-lookup", "a")]["mean_verify_width"] == 0.0
    text = format_acceptance(summarise(rows), "task")
    assert "hf-prompt-lookup" not in text
    plain_line, tree_line = text.splitlines()[1:]
    assert plain_line.split() == ["plain", "1.00/1.00", "1.00/1.00", "1.00/1.00", "0%", "100%"]
    assert tree_line.split() == ["tree", "4.00/11.00", "1.33/2.67", "2.00/4.75", "38%", "38%"]


def test_knn_is_judged_against_named_policies_and_transformers_lookup():
    """Besides Fix and Mix, KNN-SSD gets a paired verdict against every extra named policy (the single-path
    lookup a token-tree bundle must beat) and transformers' prompt lookup; not against plain or the oracle."""
    rows = []
    for i in range(12):
        rows += [run("plain", "a", 2.0, 2.0, order=i), run("knn", "a", 1.0, 2.0, order=i),
                 run("mix", "a", 1.0 + 0.2 * (i % 2) - 0.1, 2.0, order=i), run("oracle", "a", 1.0, 2.0, order=i),
                 run("lookup", "a", 1.5, 2.0, order=i), run("hf-prompt-lookup", "a", 0.8, 2.0, order=i),
                 run("hf-plain", "a", 2.0, 2.0, order=i)]
    overall = verdicts(rows)[-1]
    assert overall.startswith("task stream, overall (12 prompts): KNN-SSD 2.000")
    assert 'beats "lookup" (speedup difference +0.667 [95% CI +0.667, +0.667])' in overall
    assert 'loses to "hf-prompt-lookup" (speedup difference -0.500' in overall
    assert "Self-SD(Mix)" in overall and "oracle" not in overall and "hf-plain" not in overall


def test_per_prompt_tables_from_before_token_trees_still_rerender(tmp_path):
    """A per_prompt.csv without the tree_steps column (runs before token trees) reads it as 0; one without
    no_draft_steps (runs before 2026-12-05) reads it as unknown, shown as '-', never as 0%."""
    from pipeline.report import read_rows
    from pipeline.text_tables import format_acceptance

    path = tmp_path / "per_prompt.csv"
    old = ("tree_steps", "no_draft_steps", "prefill_seconds", "plain_prefill_seconds")
    fields = [f for f in PromptRun.__dataclass_fields__ if f not in old]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerow({f: v for f, v in asdict(run("knn", "a", 1.0, 2.0, accepted=3, drafted=4, steps=2)).items()
                         if f not in old})
    (row,) = read_rows(path)
    assert row.tree_steps == 0 and row.drafted == 4 and row.no_draft_steps is None
    summary = summarise([row])
    assert all(r["no_draft_share"] != r["no_draft_share"] for r in summary)  # NaN: not recorded
    assert format_acceptance(summary, "task").splitlines()[1].split()[-1] == "-"
    assert row.prefill_seconds is None and all(r["decode_speedup"] != r["decode_speedup"] for r in summary)


def test_markdown_tables_hold_the_summary_and_the_verdicts(tmp_path):
    """tables.md: the speedup and acceptance tables of the summary, and one verdict column per baseline."""
    from pipeline.report import write_outputs

    rows = []
    for i in range(12):
        rows += [run("plain", "a", 2.0, 2.0, order=i, steps=8), run("knn", "a", 1.0, 2.0, order=i, accepted=8,
                                                                     drafted=16, steps=4),
                 run("fix-a", "a", 1.5, 2.0, order=i, accepted=2, drafted=4, steps=6),
                 run("lookup", "a", 1.5, 2.0, order=i, accepted=2, drafted=4, steps=6)]
    write_outputs(rows, summarise(rows), tmp_path, "t")
    text = (tmp_path / "tables.md").read_text()
    assert "| **knn** | **2.00 [2.00, 2.00]** | **2.00 [2.00, 2.00]** |" in text
    assert "| knn | 3.00 / 5.00 | 3.00 / 5.00 | 0% | - |" in text and "| plain | 1.00 / 1.00 |" in text
    assert '| domain (prompts) | KNN-SSD | vs Self-SD(Fix) on average | vs "lookup" |' in text
    assert ('| overall (12) | 2.00 [2.00, 2.00] | beats, +0.667 [+0.667, +0.667] (significantly above 1, below 0 of '
            '1 fixed policies) | beats, +0.667 [+0.667, +0.667] |') in text
