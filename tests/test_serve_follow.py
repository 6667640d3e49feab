"""Following the registry, against a real MLflow server: an alias moved during load swaps the version between
requests with no failed request (each answer is that version's own); a version that fails verification is
refused and logged while the old one serves on; POST /admin/reload behind its token."""

from __future__ import annotations

import json
import logging
import time
import uuid

import httpx
import pytest

from knnssd.bundle.runtime import load_bundle
from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from registry.mlflow_store import BundleRegistry
from tests.bundles import tiny_bundle
from tests.serving import LiveServer, load_specs, run_load, sequential_answer, served_model  # noqa: F401
from tests.services import tracking_uri  # noqa: F401 (fixture)

TOKEN = "admin-token-for-tests"
# A second version that routes differently: prompt lookup on one domain, plain decoding on the other.
POLICIES_V2 = {"low": {"kind": "prompt_lookup", "max_ngram": 2, "min_ngram": 1, "max_draft_tokens": 5},
               "high": {"kind": "none"}}


@pytest.fixture()
def published(tracking_uri, served_model, tmp_path, monkeypatch):
    """A fresh bundle name with v1 (layer skipping) and v2 (prompt lookup / plain), alias production -> v1."""
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    registry = BundleRegistry(tracking_uri)
    name = f"serve-{uuid.uuid4().hex[:8]}"
    registry.publish(tiny_bundle(served_model, tmp_path / "v1", tag="v1"), name)
    registry.publish(tiny_bundle(served_model, tmp_path / "v2", tag="v2", policies=POLICIES_V2,
                                 fallback_policy={"kind": "none"}), name)
    registry.set_alias(name, "production", 1)
    return registry, name


def publish_tampered(registry: BundleRegistry, served_model, tmp_path, name: str) -> int:
    """A version whose policies.json is changed in the artifact store after publishing (its checksum fails)."""
    folder = tiny_bundle(served_model, tmp_path / "v3", tag="v3")
    version = registry.publish(folder, name)
    policies = json.loads((folder / "policies.json").read_text())
    policies["low"]["skip_set"] = {"attn": [0, 1, 2, 3], "mlp": [0, 1, 2]}
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "policies.json").write_text(json.dumps(policies))
    registry.client.log_artifact(version.run_id, str(forged / "policies.json"), artifact_path="bundle")
    return version.version


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_alias_moved_during_load_and_a_bad_version_refused(published, tracking_uri, served_model, tmp_path,
                                                           caplog):
    registry, name = published
    runtimes = {f"{name}@v{v}": load_bundle(f"{name}@v{v}", model=served_model, tracking_uri=tracking_uri)
                for v in (1, 2)}
    assert runtimes[f"{name}@v2"].bundle.policies["low"]["kind"] == "prompt_lookup"
    specs = load_specs(24, (30, 120))
    expected = {label: {spec: sequential_answer(runtime, spec) for spec in specs}
                for label, runtime in runtimes.items()}
    follower = Follower(f"{name}@production", tracking_uri, model=served_model)
    settings = ServeSettings(max_queue=64, refresh_seconds=0.3, request_timeout=60)
    with LiveServer(follower, settings) as server:
        def move_alias(answered: int) -> None:
            if answered == 0:  # after client 0's first answer: move production to v2, wait for the swap
                registry.set_alias(name, "production", 2)
                wait_for(lambda: follower.current.version == 2, 30, "the swap to v2")

        outcomes = run_load(server, f"{name}", specs, clients=8, seconds=120, between=move_alias)
        assert all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200]
        for outcome in outcomes:  # each answer is the one of the version that served it
            assert outcome.text == expected[outcome.knnssd["bundle"]][outcome.spec]
        served_by = {o.knnssd["bundle"] for o in outcomes}
        assert served_by == {f"{name}@v1", f"{name}@v2"}
        assert server.client().models.list().data[0].knnssd["bundle"] == f"{name}@v2"

        bad = publish_tampered(registry, served_model, tmp_path, name)
        registry.set_alias(name, "production", bad)
        refused = ("knnssd_bundle_reloads_total", (("outcome", "refused"),))
        wait_for(lambda: server.metrics().get(refused, 0) >= 1, 30, "the refusal")
        assert f"refused bundle {name}@v{bad}" in caplog.text and "still serving" in caplog.text
        out = server.client().completions.create(model=name, prompt="t5 t6 t7", max_tokens=5, temperature=0)
        assert out.knnssd["bundle"] == f"{name}@v2"
        metrics = server.metrics()
        assert metrics[("knnssd_bundle_reloads_total", (("outcome", "swapped"),))] == 1
        assert metrics[("knnssd_bundle_info", (("bundle", f"{name}@v2"),))] == 1
        assert not any(k[0] == "knnssd_bundle_info" and ("bundle", f"{name}@v1") in k[1] for k in metrics)


def test_admin_reload(published, tracking_uri, served_model):
    registry, name = published
    follower = Follower(f"{name}@production", tracking_uri, model=served_model)
    with LiveServer(follower, ServeSettings(refresh_seconds=0, admin_token=TOKEN)) as server:
        url = server.url + "/admin/reload"
        assert httpx.post(url).status_code == 401
        assert httpx.post(url, headers={"Authorization": "Bearer wrong-token-here"}).json()["error"]["type"] == \
            "authentication_error"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.post(url, headers=auth).json() == {"outcome": "unchanged", "bundle": f"{name}@v1",
                                                        "message": ""}
        registry.set_alias(name, "production", 2)
        time.sleep(0.5)
        assert follower.current.version == 1  # polling is off: nothing moves until asked
        answer = httpx.post(url, headers=auth, timeout=60).json()
        assert (answer["outcome"], answer["bundle"]) == ("swapped", f"{name}@v2")
        assert server.client().models.list().data[0].knnssd["bundle"] == f"{name}@v2"


def test_a_pinned_version_or_folder_is_not_followed(published, tracking_uri, served_model, tmp_path):
    registry, name = published
    pinned = Follower(f"{name}@v1", tracking_uri, model=served_model)
    registry.set_alias(name, "production", 2)
    assert pinned.check().outcome == "unchanged" and pinned.current.label == f"{name}@v1"
    folder = Follower(str(tiny_bundle(served_model, tmp_path / "folder")), model=served_model)
    assert folder.check().outcome == "fixed"


def test_a_new_version_is_warmed_up_on_the_generating_thread_before_it_serves(published, tracking_uri,
                                                                              served_model, caplog):
    registry, name = published
    caplog.set_level(logging.INFO, logger="knnssd.serve")
    follower = Follower(f"{name}@production", tracking_uri, model=served_model)
    with LiveServer(follower, ServeSettings(refresh_seconds=0, admin_token=TOKEN)) as server:
        caplog.clear()
        registry.set_alias(name, "production", 2)
        answer = httpx.post(server.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=60).json()
        assert answer["outcome"] == "swapped"
    events = [(r.getMessage(), r.threadName) for r in caplog.records if r.name == "knnssd.serve"]
    order = [message for message, _ in events]
    warming = order.index(f"warming up {name}@v2 before it serves")
    on_worker = order.index("warm-up on the generating thread")
    swapped = order.index(f"now serving {name}@v2 (was {name}@v1)")
    assert warming < on_worker < swapped, order
    assert events[on_worker][1] == "knnssd-generate"  # never beside a generation on the shared model
