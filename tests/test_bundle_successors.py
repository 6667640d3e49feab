"""Warm successor tables: built from a store's outputs, written into the bundle (schema 4), verified, and started
from by use_warm suffix trees at the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from knnssd.bundle import BundleError, read_bundle, sha256_file
from knnssd.bundle.runtime import load_bundle
from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import DraftRequest, SuccessorRecorder, SuccessorTable, SuffixTreeConfig, SuffixTreeDrafter
from knnssd.engine.policy import describe_policy, drafter_from_policy
from knnssd.errors import KnnSsdError
from pipeline.stores import DomainStore
from pipeline.successors import model_vocab, output_successors
from tests.bundles import TINY_PROMPTS, loaded, tiny_bundle  # noqa: F401 (fixture)

WARM_POLICY = {"kind": "suffix_tree", "max_ngram": 4, "max_tree_nodes": 4, "max_depth": 6, "recycled_nodes": 8,
               "recycled_k": 4, "use_warm": True}
NEW_TOKENS = 16


def ids_of(loaded, text: str) -> torch.Tensor:
    return loaded.tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def stores(loaded):
    """Each domain's store of the tiny prompts' greedy outputs, with the successors the store stage computes."""
    result = {}
    for domain, texts in TINY_PROMPTS.items():
        prompts = [ids_of(loaded, text) for text in texts]
        outputs = [generate(loaded.model, ids, GenerationConfig(max_new_tokens=NEW_TOKENS)).token_ids
                   for ids in prompts]
        result[domain] = DomainStore(domain=domain, prompts=tuple(texts), outputs=tuple(outputs),
                                     successors=output_successors(loaded.model, prompts, outputs),
                                     vocab=model_vocab(loaded.model))
    return result


def warm_bundle(loaded, folder, stores, policy=WARM_POLICY, **overrides):
    tables = {d: s.table().table for d, s in stores.items()}
    return tiny_bundle(loaded, folder, policies={"low": policy, "high": policy}, fallback_policy=policy,
                       reference_policies={"mix": {"policy": policy, "metrics": {}}},
                       **{"successors": tables, **overrides})


@pytest.fixture()
def folder(loaded, stores, tmp_path):
    return warm_bundle(loaded, tmp_path / "b", stores)


def rewrite(folder, name: str, array: np.ndarray, **declared) -> None:
    """Replace a table file and fix its checksum (and, with `declared`, its manifest row), as an attacker with
    write access would: the checksum no longer catches it, so the values must be checked."""
    np.save(folder / name, array, allow_pickle=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    for entry in manifest["successors"]:
        if entry["file"] == name:
            entry.update(declared)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_store_successors_are_the_loops_rows(loaded, stores):
    """One teacher-forced forward per entry gives the rows plain decoding's verify passes compute (a recorder
    sees the rows of new tokens 0 .. n-2; the store adds the last token's)."""
    text = TINY_PROMPTS["low"][0]
    recorder = SuccessorRecorder()
    result = generate(loaded.model, ids_of(loaded, text), GenerationConfig(max_new_tokens=NEW_TOKENS), recorder)
    rows = stores["low"].successors[0]
    assert result.token_ids == stores["low"].outputs[0] and len(rows) == len(result.token_ids)
    assert [list(r) for r in rows[:-1]] == recorder.rows


def test_the_table_is_the_updates_in_store_order_and_leave_one_out_drops_a_prompts_rows(stores):
    store = stores["low"]
    table = store.table().table
    assert table.shape == (store.vocab, 8) and table.dtype == np.int32
    expected = np.full_like(table, -1)
    for output, rows in zip(store.outputs, store.successors):
        for token, row in zip(output, rows):
            expected[token] = row  # the last write wins
    assert np.array_equal(table, expected)
    left_out = store.prompts[-1]  # its rows are written last, so they win wherever they are written
    without = store.table(exclude=left_out).table
    rest = DomainStore(domain="low", prompts=store.prompts[:-1], outputs=store.outputs[:-1],
                       successors=store.successors[:-1], vocab=store.vocab).table().table
    assert np.array_equal(without, rest) and not np.array_equal(without, table)
    assert np.array_equal(store.table(exclude="not a prompt").table, table)
    union = DomainStore.union(stores.values(), "mix").table()
    merged = SuccessorTable.merged([s.table() for s in stores.values()])
    assert np.array_equal(union.table, merged.table)  # the runtime's merged table is the mix study's


def test_tables_round_trip_with_sizes_in_the_manifest(folder, stores):
    bundle = read_bundle(folder)
    assert bundle.manifest["schema_version"] == 4
    rows = {entry["domain"]: entry for entry in bundle.manifest["successors"]}
    assert [rows[d]["file"] for d in ("low", "high")] == ["successors/0.npy", "successors/1.npy"]
    for domain, store in stores.items():
        assert np.array_equal(bundle.successors[domain], store.table().table)
        assert (rows[domain]["vocab"], rows[domain]["k"]) == bundle.successors[domain].shape
        assert rows[domain]["bytes"] == (folder / rows[domain]["file"]).stat().st_size
        assert bundle.manifest["files"][rows[domain]["file"]] == sha256_file(folder / rows[domain]["file"])


def test_a_tampered_table_is_refused(folder):
    path = folder / "successors" / "1.npy"
    data = bytearray(path.read_bytes())
    data[-4] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="successors/1.npy does not match its checksum"):
        read_bundle(folder)


@pytest.mark.parametrize("array, declared, words", [
    (np.zeros((128, 4), dtype=np.int64), {}, "int64 .* expected int32"),  # as many bytes as declared
    (np.zeros((64, 8), dtype=np.int32), {}, r"\(64, 8\), expected int32 \(128, 8\)"),
    (np.full((128, 8), 128, dtype=np.int32), {}, "ids outside -1..127"),
    (np.full((128, 8), -2, dtype=np.int32), {}, "ids outside -1..127"),
    (np.array([{"a": 1}], dtype=object), {}, "not a plain .npy array"),
    (np.zeros((128, 8), dtype=np.int32), {"k": 9}, "declares vocab 128 and k 9"),
    (np.zeros((128, 8), dtype=np.int32), {"vocab": 10 ** 6}, "successor table of 1000000 rows"),
    (np.zeros((128, 8), dtype=np.int32), {"vocab": 1}, r"larger than the \(1, 8\) table"),
])
def test_bad_tables_are_refused_and_never_unpickled(folder, array, declared, words):
    rewrite(folder, "successors/0.npy", array, **declared)
    with pytest.raises(BundleError, match=words):
        read_bundle(folder)


def test_a_bad_spec_is_refused_when_written(loaded, stores, tmp_path):
    good = stores["low"].table().table
    with pytest.raises(BundleError, match="which are not domains"):
        warm_bundle(loaded, tmp_path / "a", stores, successors={"other": good})
    with pytest.raises(BundleError, match="not a 2-D int32 array"):
        warm_bundle(loaded, tmp_path / "b", stores, successors={"low": good.astype(np.int64)})
    with pytest.raises(BundleError, match="ids outside"):
        warm_bundle(loaded, tmp_path / "c", stores, successors={"low": np.full((4, 2), 7, dtype=np.int32)})


def test_a_schema_3_bundle_without_tables_still_reads(loaded, tmp_path):
    folder = tiny_bundle(loaded, tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 3
    del manifest["successors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runtime = load_bundle(str(folder), model=loaded)
    assert runtime.bundle.successors == {} and runtime.successor_table("low") is None


def test_the_runtime_starts_each_domain_from_its_table_and_the_mix_from_the_merged_one(loaded, stores, folder):
    runtime = load_bundle(str(folder), model=loaded)
    for domain, store in stores.items():
        assert np.array_equal(runtime.drafters[domain].successors.table, store.table().table)
    merged = SuccessorTable.merged([stores["low"].table(), stores["high"].table()]).table
    assert np.array_equal(runtime.drafters["__fallback__"].successors.table, merged)
    assert np.array_equal(runtime.reference_drafter("mix").successors.table, merged)


def test_a_warm_tree_drafts_at_the_first_step_where_a_cold_one_drafts_nothing(loaded, stores, folder):
    """A text of tokens never seen before: the suffix tree matches nothing, and a cold recycling table is empty
    at the first step; the warm table already holds the domain's successors, so the first verify pass is wider.
    Either way the output is plain greedy decoding's."""
    runtime = load_bundle(str(folder), model=loaded)
    warm = runtime.drafters["low"]
    cold = drafter_from_policy({**WARM_POLICY, "use_warm": False}, loaded.num_layers)
    ids = ids_of(loaded, TINY_PROMPTS["low"][0])
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    plain = generate(loaded.model, ids, config)
    first = plain.token_ids[0]
    assert warm.successors.table[first, 0] >= 0  # the store's output starts as this one does
    with_warm, without = generate(loaded.model, ids, config, warm), generate(loaded.model, ids, config, cold)
    assert with_warm.token_ids == without.token_ids == plain.token_ids
    first_step = [DraftRequest(model=None, cache=None, last_token=torch.tensor([[first]]), position=0, max_tokens=8,
                               sampling=config.sampling, generator=None, history=[first])
                  for _ in range(2)]  # no n-gram of the text occurred before: only the table can draft
    assert len(warm.start().propose(first_step[0]).tokens) > 0
    assert len(cold.start().propose(first_step[1]).tokens) == 0
    assert with_warm.stats.accepted_tokens > without.stats.accepted_tokens


def test_use_warm_without_a_table_is_refused(loaded, stores, tmp_path):
    with pytest.raises(KnnSsdError, match="use_warm true.* but none was given"):
        drafter_from_policy(WARM_POLICY, loaded.num_layers)
    with pytest.raises(KnnSsdError, match="recycled_nodes is 0"):
        SuffixTreeConfig(use_warm=True)
    assert describe_policy(WARM_POLICY).endswith("+recycled 8x4 +warm")
    folder = warm_bundle(loaded, tmp_path / "b", stores, successors={"low": stores["low"].table().table})
    with pytest.raises(KnnSsdError, match="policy of 'high' .* ships none for it"):
        load_bundle(str(folder), model=loaded)


def test_a_table_of_another_vocabulary_is_refused_at_load(loaded, stores, tmp_path):
    small = np.full((64, 8), -1, dtype=np.int32)
    folder = warm_bundle(loaded, tmp_path / "b", stores, successors={"low": small, "high": small})
    assert read_bundle(folder).successors["low"].shape == (64, 8)  # the reader cannot know the vocabulary
    with pytest.raises(KnnSsdError, match="covers 64 token ids, but model .* has 128"):
        load_bundle(str(folder), model=loaded)
