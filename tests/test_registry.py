"""Bundles in MLflow against a real tracking server: versions, aliases, cache, bad refs, a server that is down,
concurrent publishes."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from knnssd.errors import KnnSsdError
from knnssd.bundle.runtime import load_bundle
from knnssd.bundle import BundleError, read_bundle
from registry.mlflow_store import BundleRef, BundleRegistry
from tests.bundles import loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.services import free_port, tracking_uri  # noqa: F401 (fixture)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def publish(registry, loaded, tmp_path, name, tag):
    folder = tiny_bundle(loaded, tmp_path / f"bundle-{tag}-{uuid.uuid4().hex[:6]}", tag=tag)
    return registry.publish(folder, name, params={"trials": 3, "tag": tag})


def test_three_versions_alias_and_latest(tracking_uri, loaded, tmp_path, cache):
    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    published = [publish(registry, loaded, tmp_path, name, f"t{i}") for i in range(1, 4)]
    assert [p.version for p in published] == [1, 2, 3]
    registry.set_alias(name, "production", 2)
    expected = {f"{name}@v1": "t1", f"{name}@v3": "t3", f"{name}@production": "t2", f"{name}@latest": "t3",
                name: "t3"}
    for ref, tag in expected.items():
        runtime = load_bundle(ref, model=loaded, tracking_uri=tracking_uri)
        assert runtime.bundle.manifest["calibration"]["tag"] == tag, ref
    rows = registry.versions(name)
    assert [r["version"] for r in rows] == [1, 2, 3] and rows[1]["aliases"] == ["production"]
    assert rows[0]["model_hash"] == loaded.model_hash
    run = registry.client.get_run(published[0].run_id)
    assert run.data.metrics["speedup/low"] == pytest.approx(1.1)
    assert run.data.tags["model_hash"] == loaded.model_hash and run.data.params["trials"] == "3"
    artifacts = {a.path for a in registry.client.list_artifacts(published[0].run_id, "reports")}
    assert artifacts == {"reports/domains.csv", "reports/speedup.png"}


def test_second_load_comes_from_the_cache(tracking_uri, loaded, tmp_path, cache, monkeypatch):
    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    publish(registry, loaded, tmp_path, name, "c1")
    first = registry.fetch(f"{name}@v1")
    assert first.is_relative_to(cache)

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded a version that is already cached")

    download = BundleRegistry._download_version
    monkeypatch.setattr(BundleRegistry, "_download_version", no_download)
    assert registry.fetch(f"{name}@v1") == first
    assert registry.fetch(name) == first  # the same version through another reference
    # a cached copy that was damaged is not used: it is downloaded again, and verified
    monkeypatch.setattr(BundleRegistry, "_download_version", download)
    original = (first / "policies.json").read_text()
    for damage in ("policies.json", "manifest.json"):
        (first / damage).write_text("{}")
        with monkeypatch.context() as patch:
            patch.setattr(BundleRegistry, "_download_version", no_download)
            with pytest.raises(AssertionError, match="already cached"):  # it tries to download again
                registry.fetch(f"{name}@v1")
        assert registry.fetch(f"{name}@v1") == first and (first / "policies.json").read_text() == original
    runtime = load_bundle(f"{name}@v1", model=loaded, tracking_uri=tracking_uri)
    assert runtime.bundle.folder == first
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]  # no half-written download left


def test_a_bundle_rewritten_consistently_in_the_artifact_store_is_refused(tracking_uri, loaded, tmp_path, cache):
    """Whoever can write the artifact store can change a policy and update the manifest's checksum to match;
    the digest recorded on the registry version at publish time still catches it."""
    from knnssd.bundle import sha256_file

    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    published = publish(registry, loaded, tmp_path, name, "honest")
    version = registry.client.get_model_version(name, "1")
    assert len(version.tags["manifest_sha256"]) == 64
    forged = tmp_path / "forged"
    registry.client.download_artifacts(published.run_id, "bundle", str(tmp_path / "dl"))
    (tmp_path / "dl" / "bundle").rename(forged)
    policies = json.loads((forged / "policies.json").read_text())
    policies["low"]["skip_set"] = {"attn": [0, 1, 2, 3], "mlp": [0, 1, 2]}
    (forged / "policies.json").write_text(json.dumps(policies))
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["files"]["policies.json"] = sha256_file(forged / "policies.json")
    (forged / "manifest.json").write_text(json.dumps(manifest))
    read_bundle(forged)  # consistent: the checksums alone accept it
    registry.client.log_artifacts(published.run_id, str(forged), artifact_path="bundle")  # overwrite in the store
    with pytest.raises(BundleError, match="does not match what was published"):
        load_bundle(f"{name}@v1", model=loaded, tracking_uri=tracking_uri)
    from knnssd.cli import main

    assert main(["bundles", "show", f"{name}@v1", "--tracking-uri", tracking_uri]) == 2


def test_a_run_id_that_is_not_one_never_becomes_a_path(cache):
    registry = BundleRegistry("sqlite:///unused.db")
    with pytest.raises(BundleError, match="is not a run id"):
        registry.cache_folder("name", 1, "../../etc", cache)
    assert registry.cache_folder("name", 1, "0123abcd" * 4, cache).parent == cache / "bundles" / registry.store_key() / "name"


def test_two_stores_with_the_same_name_and_version_do_not_share_the_cache(loaded, tmp_path, cache, monkeypatch):
    """Relative sqlite URIs in two folders: the same text, different stores (a real bug, now fixed)."""
    refs = {}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        registry = BundleRegistry("sqlite:///mlflow.db")
        publish(registry, loaded, tmp_path, "same-name", folder)
        refs[folder] = read_bundle(registry.fetch("same-name@v1")).manifest["calibration"]["tag"]
    assert refs == {"a": "a", "b": "b"}


@pytest.mark.parametrize("ref, words", [
    ("bad name!", "malformed bundle reference"), ("x@", "malformed"), ("@v1", "malformed")])
def test_malformed_refs(ref, words):
    with pytest.raises(BundleError, match=words):
        BundleRef.parse(ref)


def test_unknown_name_and_version_list_what_exists(tracking_uri, loaded, tmp_path, cache):
    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    publish(registry, loaded, tmp_path, name, "u1")
    with pytest.raises(BundleError, match=f"no bundle named 'nope-{name}'.*{name}"):
        registry.resolve(f"nope-{name}@v1")
    with pytest.raises(BundleError, match=r"has no version 7 .*use one of its versions: v1"):
        registry.resolve(f"{name}@v7")
    with pytest.raises(BundleError, match="has no alias 'staging'"):
        registry.resolve(f"{name}@staging")


def test_server_down_is_a_clear_error_in_bounded_time(cache):
    start = time.monotonic()
    with pytest.raises(KnnSsdError, match="did not answer within 5 s"):
        load_bundle("anything@v1", tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 15


def test_concurrent_publishes_each_get_their_own_version(tracking_uri, loaded, tmp_path, cache):
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    folders = [tiny_bundle(loaded, tmp_path / f"c{i}", tag=f"c{i}") for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        published = list(pool.map(lambda f: BundleRegistry(tracking_uri).publish(f, name), folders))
    assert sorted(p.version for p in published) == [1, 2, 3, 4]
    registry = BundleRegistry(tracking_uri)
    tags = {registry.versions(name)[v - 1]["version"]: read_bundle(registry.fetch(f"{name}@v{v}")).manifest[
        "calibration"]["tag"] for v in range(1, 5)}
    assert sorted(tags.values()) == ["c0", "c1", "c2", "c3"]  # nothing lost, nothing duplicated


def test_cli_bundles_list(tracking_uri, loaded, tmp_path, cache, capsys):
    from knnssd.cli import main

    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    publish(registry, loaded, tmp_path, name, "l1")
    publish(registry, loaded, tmp_path, name, "l2")
    registry.set_alias(name, "production", 1)
    assert main(["bundles", "list", "--tracking-uri", tracking_uri]) == 0
    assert name in capsys.readouterr().out.split()
    assert main(["bundles", "list", name, "--tracking-uri", tracking_uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("v1") and "production" in lines[1] and lines[2].startswith("v2")
    assert main(["bundles", "show", f"{name}@production", "--tracking-uri", tracking_uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["tag"] == "l1"


def test_evaluation_run_is_nested_under_the_bundle_run(tracking_uri, loaded, tmp_path):
    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    published = publish(registry, loaded, tmp_path, name, "e")
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.csv").write_text("stream,method,domain,speedup\ntask,knn,low,1.2\n")
    run_id = registry.log_evaluation(f"{name}@v1", {"max_new_tokens": 64},
                                     {"speedup/task/knn/low": 1.2, "acceptance/task/plain/low": float("nan")},
                                     results)
    run = registry.client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == published.run_id == run.data.tags["bundle_run_id"]
    assert run.data.tags["bundle_version"] == "1" and run.data.tags["kind"] == "evaluation"
    assert run.info.experiment_id == registry.client.get_run(published.run_id).info.experiment_id
    assert run.data.metrics == {"speedup/task/knn/low": pytest.approx(1.2)}  # NaN figures are left out
    assert run.data.params["max_new_tokens"] == "64"
    assert {a.path for a in registry.client.list_artifacts(run_id, "evaluation")} == {"evaluation/summary.csv"}


def test_bundles_compare_against_the_registry_and_folders(tracking_uri, loaded, tmp_path, cache, capsys):
    from knnssd.cli import main

    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    publish(registry, loaded, tmp_path, name, "a")
    folder = tiny_bundle(loaded, tmp_path / "folder-bundle", tag="b",
                         metrics={"low": {"speedup": 1.4, "mean_accepted_tokens": 2.5}, "high": {"speedup": 1.0}})
    args = ["bundles", "compare", f"{name}@v1", str(folder), "--tracking-uri", tracking_uri]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{name}@v1" in out and "\nlow\n" in out and "\nhigh\n" in out and "1.400" in out
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["ref"] for b in result["bundles"]] == [f"{name}@v1", str(folder)]
    low = result["domains"]["low"]
    assert low[str(folder)]["metrics"]["speedup"] == 1.4 and low[f"{name}@v1"]["metrics"]["speedup"] == 1.1
    assert low[str(folder)]["policy"]["kind"] == "layer_skip" and low[str(folder)]["description"].startswith("layer_skip")
    for bad, words in (([f"{name}@v9", str(folder)], "has no version 9"), ([f"nobody-{name}", str(folder)],
                                                                             "no bundle named"),
                       ([str(folder)], "at least two bundles"), ([str(tmp_path / "nope/"), str(folder)],
                                                                  "does not exist")):
        assert main(["bundles", "compare", *bad, "--tracking-uri", tracking_uri]) == 2
        err = capsys.readouterr().err
        assert words in err and err.startswith("error: ") and "Traceback" not in err
