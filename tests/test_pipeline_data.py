"""Calibration input: readers, split, and clear errors before any cluster work."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from knnssd.errors import KnnSsdError
from pipeline.data import (CALIBRATION, HELD_OUT, SPEC_BENCH_MT_CATEGORIES, DataConfig, domains_of,
                           load_calibration_table, prompts_of, read_prompts)
from pipeline.search import SearchConfig
from tests.conftest import spec_bench_path, spec_bench_rows


def test_spec_bench_with_mt_bench_merged_into_chat():
    spec_bench_rows()  # skips when the file is absent
    config = DataConfig(path=str(spec_bench_path()), merge={c: "chat" for c in SPEC_BENCH_MT_CATEGORIES})
    table = load_calibration_table(config, min_calibration=4)
    domains = domains_of(table)
    assert set(domains) == {"translation", "summarization", "qa", "math_reasoning", "rag", "chat"}
    assert table.num_rows == 480
    held = prompts_of(table, "qa", HELD_OUT)
    assert len(held) == round(80 * 0.25) and not set(held) & set(prompts_of(table, "qa", CALIBRATION))
    again = load_calibration_table(config, min_calibration=4)
    assert again.equals(table)  # seeded: the same split every time


def test_generic_jsonl_and_parquet_with_column_mapping(tmp_path):
    rows = [{"topic": d, "text": f"{d} prompt {i}"} for d in ("a", "b") for i in range(5)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        got = read_prompts(DataConfig(path=str(path), columns={"domain": "topic", "prompt": "text"}))
        assert got == [(r["topic"], r["text"]) for r in rows]


def test_default_is_the_built_in_demo_set():
    table = load_calibration_table(DataConfig(), min_calibration=4)
    assert domains_of(table) == ["coding", "math", "translation", "chat"] and table.num_rows == 40


@pytest.mark.parametrize("setup, words", [
    ("missing", "does not exist"),
    ("empty", "holds no prompts"),
    ("unknown-column", "has no column 'topic'"),
    ("too-few", "domain 'b' has 3 distinct prompts: too few"),
    ("unknown-domain", r"domains \['zzz'\] not in the data"),
])
def test_bad_data_is_a_clear_error(tmp_path, setup, words):
    path = tmp_path / "d.jsonl"
    rows = [{"domain": "a", "prompt": f"x {i}"} for i in range(8)] + [{"domain": "b", "prompt": f"y {i}"}
                                                                        for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = DataConfig(path=str(path))
    if setup == "missing":
        config = DataConfig(path=str(tmp_path / "nope.jsonl"))
    elif setup == "empty":
        path.write_text("\n")
    elif setup == "unknown-column":
        config = DataConfig(path=str(path), columns={"domain": "topic"})
    elif setup == "unknown-domain":
        config = DataConfig(path=str(path), domains=("zzz",))
    with pytest.raises(KnnSsdError, match=words):
        load_calibration_table(config, min_calibration=4)


def test_zero_trials_and_bad_search_settings():
    with pytest.raises(KnnSsdError, match="--trials must be >= 1"):
        SearchConfig(trials=0)
    with pytest.raises(KnnSsdError, match="unknown sampler"):
        SearchConfig(sampler="grid")


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps({"domain": d, "prompt": p}) for d, p in rows))
    return str(path)


def test_duplicate_prompts_are_kept_once_and_never_straddle_the_split(tmp_path):
    """Repeats of a prompt (also with other whitespace) are dropped, so the split is the one of the file without
    them: every text on one side only, the same table, the same fingerprint, for every seed."""
    from pipeline.data import data_fingerprint, normalise_prompt

    rows = [(d, f"{d} prompt number {i}") for d in ("a", "b") for i in range(12)]
    repeats = [("a", "a prompt number 3"), ("a", "  a prompt\tnumber 7 "), ("b", "b  prompt number 0"),
               ("a", "a prompt number 3")]  # each after its first occurrence: the one kept, as written
    for seed in range(5):
        config = DataConfig(path=write_rows(tmp_path / "plain.jsonl", rows), seed=seed)
        plain = load_calibration_table(config, min_calibration=2)
        config = DataConfig(path=write_rows(tmp_path / "dup.jsonl", rows[:12] + repeats[:2] + rows[12:] + repeats[2:]), seed=seed)
        table = load_calibration_table(config, min_calibration=2)
        assert table.equals(plain) and data_fingerprint(table) == data_fingerprint(plain)
        for domain in ("a", "b"):
            held = {normalise_prompt(p) for p in prompts_of(table, domain, HELD_OUT)}
            calibration = [normalise_prompt(p) for p in prompts_of(table, domain, CALIBRATION)]
            assert not held & set(calibration) and len(calibration) == len(set(calibration)) == 9
    assert len({data_fingerprint(load_calibration_table(DataConfig(path=config.path, seed=s), 2))
                for s in range(5)}) == 5  # the seed still decides the split


def test_a_prompt_in_two_domains_is_refused_unless_the_domains_are_merged(tmp_path):
    rows = [(d, f"{d} prompt {i}") for d in ("a", "b", "c") for i in range(6)] + [("c", "a  prompt 2"),
                                                                                   ("b", "a prompt 4")]
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(KnnSsdError, match=r"the prompt 'a  prompt 2' appears in domains 'a' and 'c' \(2 prompts"):
        load_calibration_table(DataConfig(path=path), min_calibration=2)
    with pytest.raises(KnnSsdError, match="the prompt 'a prompt 4' appears in domains 'a' and 'b'"):
        load_calibration_table(DataConfig(path=path, domains=("a", "b")), min_calibration=2)
    assert load_calibration_table(DataConfig(path=path, domains=("b", "c")), min_calibration=2).num_rows == 14
    merged = load_calibration_table(DataConfig(path=path, merge={"b": "a", "c": "a"}), min_calibration=2)
    assert merged.num_rows == 18  # kept once each in the merged domain


def test_the_fingerprint_check_names_both_fingerprints_and_the_fix(tmp_path):
    from pipeline.data import check_fingerprint, data_fingerprint

    rows = [("a", f"prompt {i}") for i in range(8)]
    table = load_calibration_table(DataConfig(path=write_rows(tmp_path / "a.jsonl", rows)), min_calibration=2)
    recorded = data_fingerprint(table)
    check_fingerprint(table, recorded, "a.jsonl")  # the same file: accepted
    check_fingerprint(table, None, "a.jsonl")  # nothing recorded: the caller decides
    changed = load_calibration_table(DataConfig(path=write_rows(tmp_path / "b.jsonl", rows + [("a", "new")])),
                                     min_calibration=2)
    found = data_fingerprint(changed)
    assert found != recorded
    with pytest.raises(KnnSsdError, match=f"b.jsonl splits to fingerprint {found}, but the bundle was calibrated "
                                          f"on data with fingerprint {recorded}") as error:
        check_fingerprint(changed, recorded, "b.jsonl")
    assert "pass the exact file the bundle was calibrated on" in error.value.fix
