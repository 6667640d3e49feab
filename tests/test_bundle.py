"""Bundle format, verification, and the runtime's routed, lossless generation (no MLflow here)."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.errors import KnnSsdError
from knnssd.bundle.runtime import load_bundle
from knnssd.bundle import BundleError, read_bundle
from tests.bundles import TINY_PROMPTS, loaded, tiny_bundle  # noqa: F401 (fixture)


@pytest.fixture()
def bundle_dir(loaded, tmp_path):
    return tiny_bundle(loaded, tmp_path / "b")


def test_round_trip(bundle_dir):
    bundle = read_bundle(bundle_dir)
    assert bundle.domains == ("low", "high")
    assert bundle.index.ntotal == 4 and len(bundle.anchor_domains) == 4
    assert {d["name"]: d["anchors"] for d in bundle.manifest["domains"]} == {"low": 2, "high": 2}
    assert set(bundle.manifest["files"]) == {"anchors.npy", "anchors.json", "policies.json"}
    assert bundle.manifest["schema_version"] == 4 and bundle.manifest["fallback_policy"]["kind"] == "layer_skip"
    assert bundle.manifest["stores"] == [] and bundle.stores == {}
    assert bundle.manifest["fallback_policy"]["skip_set"] == {"attn": [3], "mlp": []}  # what both domains skip


def test_reading_never_unpickles(bundle_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bundle loading unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    read_bundle(bundle_dir)


@pytest.mark.parametrize("damage", ["tamper-policies", "truncate-anchors", "delete-labels", "schema", "no-manifest"])
def test_damaged_bundles_are_refused(bundle_dir, damage):
    if damage == "tamper-policies":
        path = bundle_dir / "policies.json"
        path.write_text(path.read_text().replace('"threshold": 0.0', '"threshold": 0.1', 1))
        words = "does not match its checksum"
    elif damage == "truncate-anchors":
        path = bundle_dir / "anchors.npy"
        path.write_bytes(path.read_bytes()[:-16])
        words = "does not match its checksum"
    elif damage == "delete-labels":
        (bundle_dir / "anchors.json").unlink()
        words = "is missing"
    elif damage == "schema":
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        manifest["schema_version"] = 99
        (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
        words = "schema version 99 is not supported"
    else:
        (bundle_dir / "manifest.json").unlink()
        words = "not a routing bundle"
    with pytest.raises(BundleError, match=words):
        read_bundle(bundle_dir)


def test_routed_generation_is_lossless_and_reports_the_domain(loaded, bundle_dir):
    runtime = load_bundle(str(bundle_dir), model=loaded)
    for domain, texts in TINY_PROMPTS.items():
        for text in texts[:3]:
            out = runtime.generate(text, max_new_tokens=20)
            assert out.route.domain == domain and not out.route.fallback
            assert out.route.distance < runtime.bundle.fallback_distance
            assert out.policy == runtime.bundle.policies[domain]
            ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
            assert out.result.token_ids == generate(loaded.model, ids, GenerationConfig(max_new_tokens=20)).token_ids


def test_far_prompt_falls_back(loaded, tmp_path):
    runtime = load_bundle(str(tiny_bundle(loaded, tmp_path / "b", fallback_distance=-1.0)), model=loaded)
    out = runtime.generate("t50 t51 t52 t53", max_new_tokens=8)
    assert out.route.fallback and out.policy == runtime.bundle.manifest["fallback_policy"]


def test_model_hash_mismatch_is_refused_unless_overridden(loaded, tmp_path):
    folder = tiny_bundle(loaded, tmp_path / "b", model_hash="0" * 64)
    with pytest.raises(KnnSsdError, match="calibrated on model .* with hash 000000000000"):
        load_bundle(str(folder), model=loaded)
    assert load_bundle(str(folder), model=loaded, allow_model_mismatch=True).bundle.model_hash == "0" * 64


def test_missing_folder_ref(tmp_path):
    with pytest.raises(KnnSsdError, match="does not exist"):
        load_bundle(str(tmp_path / "nope"))


def test_cli_generate_with_a_bundle_and_show(loaded, bundle_dir, capsys, monkeypatch, tmp_path):
    from knnssd.cli import main

    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    text = TINY_PROMPTS["high"][0]
    assert main(["generate", "--bundle", str(bundle_dir), "--model", loaded.source, "--prompt", text,
                 "--max-new-tokens", "10", "--compare-ar", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["domain"] == "high" and report["fallback"] is False and report["distance"] >= 0
    assert report["token_ids"] == report["ar_token_ids"]
    assert report["drafter"]["skip_set"] == {"attn": [3], "mlp": [1]}
    assert main(["bundles", "show", str(bundle_dir)]) == 0
    shown = capsys.readouterr().out
    assert "low" in shown and "high" in shown and "fallback beyond cosine distance" in shown
    assert "layer_skip attn[3] mlp[1] t=0.0 k<=3" in shown  # each domain's policy, described
    assert main(["generate", "--bundle", str(bundle_dir), "--skip-set", "{}", "--prompt", "x"]) == 2
    assert "--bundle and --skip-set given together" in capsys.readouterr().err


def rewrite_consistently(folder, name: str, data: bytes) -> None:
    """Replace one bundle file and update the manifest's checksum to match, as an attacker with write access
    to the files would: the checksums alone no longer catch it, so the values themselves must be checked."""
    from knnssd.bundle import sha256_file

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("labels, words", [([0, 1, -1, 1], "not a domain index"), ([0, 1, 5, 1], "not a domain index"),
                                           ([0, 1, True, 1], "not a domain index"), ([0, 1], r"expected float32 \(2,")])
def test_anchor_labels_are_range_checked_even_with_matching_checksums(bundle_dir, labels, words):
    meta = json.loads((bundle_dir / "anchors.json").read_text())
    rewrite_consistently(bundle_dir, "anchors.json", json.dumps({**meta, "labels": labels}).encode())
    with pytest.raises(BundleError, match=words):
        read_bundle(bundle_dir)


@pytest.mark.parametrize("array, words", [
    (lambda a: a.astype(np.float64), "expected float32"),
    (lambda a: a[:, :-1], "expected float32"),
    (lambda a: a * 3.0, "non-unit"),
    (lambda a: np.full_like(a, np.nan), "non-finite"),
    (lambda a: np.array([{"evil": 1}], dtype=object), "not a plain .npy array"),
])
def test_anchors_are_checked_and_never_unpickled(bundle_dir, monkeypatch, array, words):
    anchors = np.load(bundle_dir / "anchors.npy")
    buffer = io.BytesIO()
    np.save(buffer, array(anchors), allow_pickle=True)
    rewrite_consistently(bundle_dir, "anchors.npy", buffer.getvalue())

    def refuse(*args, **kwargs):
        raise AssertionError("bundle loading unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(BundleError, match=words):
        read_bundle(bundle_dir)


def test_a_model_of_another_width_is_refused_at_load(loaded, bundle_dir, tmp_path):
    from knnssd.engine.models import load_model
    from tests.test_models import save_tiny

    save_tiny(tmp_path / "wide", hidden_size=96)
    wide = load_model(str(tmp_path / "wide"), device="cpu")
    with pytest.raises(KnnSsdError, match="routes 64-dimensional embeddings"):
        load_bundle(str(bundle_dir), model=wide, allow_model_mismatch=True)


def test_router_refuses_an_embedding_of_the_wrong_size(bundle_dir):
    from knnssd.bundle.routing import Router

    bundle = read_bundle(bundle_dir)
    router = Router(index=bundle.index, anchor_domains=bundle.anchor_domains, domains=bundle.domains,
                    fallback_distance=bundle.fallback_distance)
    with pytest.raises(KnnSsdError, match="has 65 dimensions but the bundle's anchors have 64"):
        router.route(torch.ones(65))


def test_concurrent_generate_calls_equal_sequential_ones(loaded, bundle_dir):
    """The runtime serialises generation on its model: threads never see each other's skipped sub-layers."""
    from concurrent.futures import ThreadPoolExecutor

    runtime = load_bundle(str(bundle_dir), model=loaded)
    prompts = [t for texts in TINY_PROMPTS.values() for t in texts[:3]] * 2
    sequential = [runtime.generate(p, max_new_tokens=10).result.token_ids for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda p: runtime.generate(p, max_new_tokens=10).result.token_ids, prompts))
    assert concurrent == sequential
    plain = [generate(loaded.model, runtime.encode(p), GenerationConfig(max_new_tokens=10)).token_ids for p in prompts]
    assert sequential == plain


def test_a_bundle_with_no_anchors_is_refused_when_read(bundle_dir):
    """It used to pass verification and fail with an IndexError at the first routed prompt."""
    meta = json.loads((bundle_dir / "anchors.json").read_text())
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((0, meta["dim"]), dtype="<f4"), allow_pickle=False)
    rewrite_consistently(bundle_dir, "anchors.npy", buffer.getvalue())
    rewrite_consistently(bundle_dir, "anchors.json", json.dumps({**meta, "labels": []}).encode())
    with pytest.raises(BundleError, match="lists no anchors"):
        read_bundle(bundle_dir)


def test_an_npz_anchors_file_is_a_clear_error(bundle_dir):
    """np.load gives an NpzFile for an .npz archive; it used to fail with an AttributeError."""
    buffer = io.BytesIO()
    np.savez(buffer, anchors=np.load(bundle_dir / "anchors.npy"))
    rewrite_consistently(bundle_dir, "anchors.npy", buffer.getvalue())
    with pytest.raises(BundleError, match="an .npz archive"):
        read_bundle(bundle_dir)


def test_a_folder_named_like_a_registry_reference_never_replaces_it(loaded, bundle_dir, tmp_path, monkeypatch):
    """`name@v3` is a registry reference even where a folder of that name exists here (it used to load the folder
    and skip the registry's digest check); the folder is loaded when written as a path."""
    from knnssd.bundle import is_folder_reference
    from knnssd.bundle.sources import fetch_bundle

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    bundle_dir.rename(tmp_path / "tiny@v3")
    assert not is_folder_reference("tiny@v3") and not is_folder_reference("tiny")
    assert all(is_folder_reference(ref) for ref in ("./tiny@v3", "out/b", "/abs/b", "~/b", "."))
    with pytest.raises(KnnSsdError, match=r"no bundle named 'tiny'.*a folder of that name exists here.*\./tiny@v3"):
        fetch_bundle("tiny@v3", tracking_uri=f"sqlite:///{tmp_path}/empty.db")
    assert load_bundle("./tiny@v3", model=loaded).bundle.domains == ("low", "high")


def test_a_router_without_anchors_is_refused(bundle_dir):
    import faiss

    from knnssd.bundle.routing import Router

    with pytest.raises(KnnSsdError, match="at least one anchor"):
        Router(index=faiss.IndexFlatIP(64), anchor_domains=(), domains=("low",), fallback_distance=0.5)
