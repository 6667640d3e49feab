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
    ("too-few", "domain 'b' has 3 prompts: too few"),
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
