"""Per-domain stores: built by batched greedy decoding, written into the bundle, verified, and drafted from."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from knnssd.bundle import reading as bundle_reading, stores as bundle_stores
from knnssd.bundle import (BundleError, MAX_STORE_TOKENS, STORE_SEPARATOR, join_store, read_bundle, sha256_file,
                           split_store)
from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters.suffix_tree import SEPARATOR
from knnssd.errors import KnnSsdError
from knnssd.bundle.runtime import load_bundle
from pipeline.stores import DomainStore, build_outputs
from tests.bundles import TINY_PROMPTS, loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.services import tracking_uri  # noqa: F401 (fixture)

STORE_POLICY = {"kind": "suffix_tree", "max_ngram": 4, "min_ngram": 1, "max_occurrences": 4, "max_depth": 8,
                "max_tree_nodes": 8, "min_path_prob": 0.1, "use_store": True}
NEW_TOKENS = 24


def ids_of(loaded, text: str) -> torch.Tensor:
    return loaded.tokenizer(text, return_tensors="pt")["input_ids"]


def greedy(loaded, text: str, tokens: int = NEW_TOKENS) -> tuple[int, ...]:
    return generate(loaded.model, ids_of(loaded, text), GenerationConfig(max_new_tokens=tokens)).token_ids


def store_bundle(loaded, folder, stores: dict[str, np.ndarray], policy=STORE_POLICY, **overrides):
    """The tiny two-domain bundle with a store-drafting policy everywhere (the mix reference too)."""
    return tiny_bundle(loaded, folder, policies={"low": policy, "high": policy}, fallback_policy=policy,
                       reference_policies={"mix": {"policy": policy, "metrics": {}}}, stores=stores, **overrides)


@pytest.fixture(scope="module")
def outputs(loaded):
    """Each tiny prompt's own greedy output, by domain."""
    return {domain: [greedy(loaded, text) for text in texts] for domain, texts in TINY_PROMPTS.items()}


@pytest.fixture()
def folder(loaded, outputs, tmp_path):
    return store_bundle(loaded, tmp_path / "b", {d: join_store(o) for d, o in outputs.items()})


def rewrite(folder, name: str, data: bytes, **declared) -> None:
    """Replace a store file and fix its checksum (and, with `declared`, its manifest row), as an attacker with
    write access would: the checksum no longer catches it, so the values must be checked."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    for entry in manifest["stores"]:
        if entry["file"] == name:
            entry.update(declared)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_the_separator_is_the_drafters():
    assert STORE_SEPARATOR == SEPARATOR
    arrays = [(5, 6, 7), (), (9,)]
    assert join_store(arrays).tolist() == [5, 6, 7, -1, -1, 9, -1] and split_store(join_store(arrays)) == arrays


def test_stores_round_trip_with_sizes_in_the_manifest(folder, outputs):
    bundle = read_bundle(folder)
    assert bundle.manifest["schema_version"] == 4
    rows = {entry["domain"]: entry for entry in bundle.manifest["stores"]}
    assert [rows[d]["file"] for d in ("low", "high")] == ["stores/0.npy", "stores/1.npy"]  # named by index
    for domain, arrays in outputs.items():
        assert split_store(bundle.stores[domain]) == [tuple(a) for a in arrays]
        assert rows[domain]["arrays"] == len(arrays) and rows[domain]["tokens"] == sum(map(len, arrays))
        assert rows[domain]["bytes"] == (folder / rows[domain]["file"]).stat().st_size
        assert bundle.manifest["files"][rows[domain]["file"]] == sha256_file(folder / rows[domain]["file"])
    assert not (folder / "stores" / "mix.npy").exists() and len(list((folder / "stores").iterdir())) == 2


def test_a_tampered_store_is_refused(folder):
    path = folder / "stores" / "0.npy"
    data = bytearray(path.read_bytes())
    data[-8] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="stores/0.npy does not match its checksum"):
        read_bundle(folder)


def test_a_deleted_store_is_refused(folder):
    (folder / "stores" / "1.npy").unlink()
    with pytest.raises(BundleError, match="stores/1.npy is missing"):
        read_bundle(folder)


def test_a_signature_covers_the_store_files(folder, tmp_path):
    from knnssd.bundle.signing import SignatureError, generate_key_pair, sign_bundle

    private, public = generate_key_pair(tmp_path / "release")
    sign_bundle(folder, private)
    assert read_bundle(folder, keys=[public]).authenticity.verified
    store = read_bundle(folder, keys=[]).stores["low"].copy()
    store[0] = (store[0] + 1) % 100
    rewrite(folder, "stores/0.npy", npy(store))  # checksums consistent: only the signature can tell
    read_bundle(folder, keys=[])
    with pytest.raises(SignatureError, match="its files differ"):
        read_bundle(folder, keys=[public])


def test_oversized_stores_are_refused_from_the_manifest_before_any_store_is_read(folder, monkeypatch):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stores"][0]["tokens"] = MAX_STORE_TOKENS
    (folder / "manifest.json").write_text(json.dumps(manifest))

    def refuse(*args, **kwargs):
        raise AssertionError("a store file was hashed or loaded before its declared size was checked")

    monkeypatch.setattr(bundle_reading, "sha256_file", refuse)
    monkeypatch.setattr(np, "load", refuse)
    with pytest.raises(BundleError, match=f"more than {MAX_STORE_TOKENS} entries"):
        read_bundle(folder)


def test_a_store_file_larger_than_declared_is_refused_before_it_is_hashed(folder):
    rewrite(folder, "stores/0.npy", npy(np.full(5000, 7, dtype=np.int32)))
    with pytest.raises(BundleError, match="larger than the .* entries it declares"):
        read_bundle(folder)


def test_the_loaded_store_must_match_its_manifest_row(folder):
    rewrite(folder, "stores/0.npy", npy(join_store([(4, 5)])))
    with pytest.raises(BundleError, match="holds 1 arrays of 2 tokens, but the manifest says"):
        read_bundle(folder)


def test_an_oversized_spec_is_refused_when_written(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_stores, "MAX_STORE_TOKENS", 10)
    with pytest.raises(BundleError, match="more than a bundle may"):
        store_bundle(loaded, tmp_path / "b", {"low": join_store([tuple(range(20))])})
    with pytest.raises(BundleError, match="not domains"):
        store_bundle(loaded, tmp_path / "c", {"mix": join_store([(1,)])})


@pytest.mark.parametrize("array, words", [
    (np.array([{"evil": 1}], dtype=object), "not a plain .npy array"),
    (np.array([3, 4, -1], dtype=np.int64), "expected a 1-D int32 array"),
    (np.array([3.0, 4.0, -1.0], dtype=np.float32), "expected a 1-D int32 array"),
    (np.array([[3, 4, -1]], dtype=np.int32), "expected a 1-D int32 array"),
    (np.array([3, -7, -1], dtype=np.int32), "ids below -1"),
    (np.array([3, 4, 5], dtype=np.int32), "does not end with a separator"),
])
def test_bad_store_files_are_refused_and_never_unpickled(folder, array, words):
    rewrite(folder, "stores/0.npy", npy(array), arrays=1, tokens=2)
    with pytest.raises(BundleError, match=words):
        read_bundle(folder)


def test_ids_outside_the_models_vocabulary_are_refused_at_load(loaded, tmp_path):
    vocab = loaded.model.config.vocab_size
    folder = store_bundle(loaded, tmp_path / "b", {"high": join_store([(5, vocab)])})
    assert read_bundle(folder).stores["high"].max() == vocab  # the reader cannot know the vocabulary
    with pytest.raises(KnnSsdError, match=f"token id {vocab}, outside the vocabulary"):
        load_bundle(str(folder), model=loaded)


def test_a_schema_2_bundle_without_stores_still_reads(loaded, tmp_path):
    folder = tiny_bundle(loaded, tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 2
    del manifest["stores"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runtime = load_bundle(str(folder), model=loaded)
    assert runtime.bundle.stores == {} and runtime.store_arrays("low") is None and runtime.store_arrays("mix") is None


def test_store_drafting_is_lossless_and_drafts_from_the_store(loaded, outputs, tmp_path):
    """The store holds the model's own greedy output of each prompt, so the drafts of a prompt whose output is
    in the store are accepted; with another domain's outputs in its place, none is."""
    own = load_bundle(str(store_bundle(loaded, tmp_path / "own", {d: join_store(o) for d, o in outputs.items()})),
                      model=loaded)
    swapped = load_bundle(str(store_bundle(loaded, tmp_path / "swapped", {
        "low": join_store(outputs["high"]), "high": join_store(outputs["low"])})), model=loaded)
    for domain, texts in TINY_PROMPTS.items():
        for text, expected in zip(texts[:3], outputs[domain]):
            with_store, without = own.generate(text, NEW_TOKENS), swapped.generate(text, NEW_TOKENS)
            assert with_store.route.domain == domain and not with_store.route.fallback
            assert with_store.result.token_ids == without.result.token_ids == expected  # lossless either way
            assert with_store.result.stats.accepted_tokens >= len(expected) // 2, with_store.result.stats
            assert with_store.result.stats.accepted_tokens > without.result.stats.accepted_tokens


def test_the_mix_reference_and_the_fallback_draft_from_the_union(loaded, outputs, folder):
    runtime = load_bundle(str(folder), model=loaded)
    union = [tuple(a) for a in outputs["low"] + outputs["high"]]
    assert runtime.store_arrays("mix") == runtime.store_arrays("__fallback__") == union
    assert runtime.store_arrays("high") == [tuple(a) for a in outputs["high"]]
    drafter = runtime.reference_drafter("mix")
    assert drafter.store.arrays == len(union) and runtime.drafters["__fallback__"].store.arrays == len(union)
    assert runtime.drafters["low"].store.arrays == len(outputs["low"])
    with pytest.raises(KnnSsdError, match="no reference policy 'other'"):
        runtime.reference_drafter("other")
    with pytest.raises(KnnSsdError, match="no domain 'nope'"):
        runtime.store_arrays("nope")


def test_a_store_policy_without_a_store_is_refused_at_load(loaded, outputs, tmp_path):
    folder = store_bundle(loaded, tmp_path / "b", {"low": join_store(outputs["low"])})
    with pytest.raises(KnnSsdError, match="drafts from a store .* but none was given"):
        load_bundle(str(folder), model=loaded)


def test_show_lists_each_domains_store(folder, outputs, capsys):
    from knnssd.cli import main

    assert main(["bundles", "show", str(folder)]) == 0
    shown = capsys.readouterr().out
    low = f"{len(outputs['low'])} arrays {sum(map(len, outputs['low']))} tok"
    union = f"{len(outputs['low']) * 2} arrays {sum(map(len, outputs['low'] + outputs['high']))} tok"
    assert any(line.startswith("low") and low in line for line in shown.splitlines()), shown
    assert any(line.startswith("(mix)") and union in line for line in shown.splitlines()), shown
    assert "+store" in shown


def test_build_outputs_batched_equals_unbatched_greedy_and_stops_at_eos(loaded):
    """Prompts of different lengths in one left-padded batch. On this tiny fp32 model no near-tie flips a
    token, so each batched output equals the unbatched greedy output in full (a larger model may differ at
    near-ties: fine for a store)."""
    texts = [TINY_PROMPTS["low"][0], " ".join(TINY_PROMPTS["high"][1].split()[:5]), TINY_PROMPTS["high"][2] + " t9"]
    prompts = [ids_of(loaded, t) for t in texts]
    assert len({p.shape[1] for p in prompts}) == 3
    expected = [greedy(loaded, t, 16) for t in texts]
    seen = []
    assert build_outputs(loaded.model, prompts, 16, batch_size=2, progress=lambda d, n: seen.append((d, n))) == expected
    assert seen == [(2, 3), (3, 3)]
    eos = expected[0][3]  # make the 4th token of the first output the EOS: its output stops right after it
    saved = loaded.model.generation_config.eos_token_id
    try:
        loaded.model.generation_config.eos_token_id = eos
        cut = build_outputs(loaded.model, prompts, 16, batch_size=3)
    finally:
        loaded.model.generation_config.eos_token_id = saved
    for got, full in zip(cut, expected):
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert got == full[:stop]
    assert cut[0] == expected[0][:expected[0].index(eos) + 1] and len(cut[0]) <= 4


def test_build_outputs_refuses_bad_budgets(loaded):
    with pytest.raises(KnnSsdError, match="max_new_tokens >= 1"):
        build_outputs(loaded.model, [], 0)
    with pytest.raises(KnnSsdError, match="batch size"):
        build_outputs(loaded.model, [], 8, batch_size=0)


def test_domain_store_joined_is_what_the_bundle_keeps():
    store = DomainStore("d", ("a", "b"), ((1, 2), (3,)))
    assert store.joined().dtype == np.int32 and split_store(store.joined()) == [(1, 2), (3,)]


def test_the_store_stage_runs_one_ray_task_per_domain(loaded, outputs):
    """`build_stores` on a real local Ray: each domain's store holds its prompts' greedy outputs (batched,
    which on this tiny model equals unbatched greedy), and "mix" is their union."""
    import ray

    from pipeline.cluster import connect
    from pipeline.embedding_stage import run_embeddings
    from pipeline.store_stage import build_stores
    from pipeline.tasks import ModelSpec, embed_prompts

    logged = []
    spec = ModelSpec(name=loaded.source, chat=False, threads=1)
    extra = "a prompt no store has decoded"
    table = pa.table({"domain": ["high", "low", "high"],
                      "prompt": [TINY_PROMPTS["high"][1], TINY_PROMPTS["low"][0], extra]})
    connect(None)
    try:
        stores = build_stores(spec, TINY_PROMPTS, NEW_TOKENS, 4, logged.append, mix="mix")
        # embeddings: the stores' own prefills where they have the prompt, a Ray task for the rest; both equal the
        # runtime's embedding (`embed_prompts`) bit for bit
        embeddings = run_embeddings(spec, 16, table, stores, logged.append)
        expected = ray.get(embed_prompts.remote(spec, table["prompt"].to_pylist()))
    finally:
        ray.shutdown()
    assert np.array_equal(embeddings, expected) and embeddings.dtype == np.float32
    assert "embed: 2 prompts from the store stage's prefills, 1 prefilled" in "\n".join(logged)
    assert list(stores) == ["low", "high", "mix"]
    for domain, texts in TINY_PROMPTS.items():
        assert stores[domain].prompts == tuple(texts) and list(stores[domain].outputs) == outputs[domain]
    assert stores["mix"].outputs == stores["low"].outputs + stores["high"].outputs
    assert any(line.startswith("store: [low] 6 outputs") for line in logged), logged


def test_stores_travel_through_the_registry_and_its_cache(folder, loaded, outputs, tracking_uri, tmp_path,
                                                          monkeypatch):
    """Published to a real MLflow server, fetched into the cache (stores/ is a subfolder) and verified; a
    damaged cached store is downloaded again."""
    import uuid

    from registry.mlflow_store import BundleRegistry

    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    name = f"stores-{uuid.uuid4().hex[:8]}"
    BundleRegistry(tracking_uri).publish(folder, name)
    runtime = load_bundle(f"{name}@v1", model=loaded, tracking_uri=tracking_uri)
    assert runtime.store_arrays("low") == [tuple(a) for a in outputs["low"]]
    cached = runtime.bundle.folder / "stores" / "1.npy"
    cached.write_bytes(cached.read_bytes()[:-4])
    again = load_bundle(f"{name}@v1", model=loaded, tracking_uri=tracking_uri)
    assert again.store_arrays("high") == [tuple(a) for a in outputs["high"]]
