"""Signed bundles (knnssd/bundle/signing.py): who vouches for a bundle, checked before anything in it is read.

The attacks of issue 23 are played with write access to the tracking store only (its sqlite database, through
MLflow's client and plain SQL): the attacker cannot sign with the trusted key. Each is refused once a trusted key
is configured, and each one's first half shows that without a key the attack would have worked.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import uuid
from pathlib import Path

import pytest

from knnssd.bundle import manifest_digest, read_bundle
from knnssd.bundle.runtime import load_bundle
from knnssd.bundle.signing import (SIGNATURE_FILE, TRUSTED_KEYS_ENV, SignatureError, generate_key_pair, sign_bundle,
                            trusted_keys, verify_signature)
from registry.mlflow_store import MANIFEST_TAG, BundleRegistry
from tests.bundles import loaded, tiny_bundle  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: the publisher's (trusted) and an attacker's."""
    root = tmp_path_factory.mktemp("keys")
    return {"trusted": generate_key_pair(root / "release"), "attacker": generate_key_pair(root / "attacker")}


@pytest.fixture(autouse=True)
def no_inherited_keys(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)


@pytest.fixture()
def signed(loaded, tmp_path, keys):
    folder = tiny_bundle(loaded, tmp_path / "b")
    sign_bundle(folder, keys["trusted"][0])
    return folder


def test_generated_keys_are_pem_private_600_and_never_overwritten(tmp_path):
    private, public = generate_key_pair(tmp_path / "k")
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    with pytest.raises(SignatureError, match="already exists"):
        generate_key_pair(tmp_path / "k")


def test_a_signed_bundle_verifies_against_its_key_only(signed, keys):
    bundle = read_bundle(signed, keys=[keys["trusted"][1]])
    assert bundle.authenticity.verified and bundle.authenticity.key == str(keys["trusted"][1])
    assert "signature verified" in bundle.authenticity.describe()
    with pytest.raises(SignatureError, match="signed by a key that is not among the trusted ones"):
        read_bundle(signed, keys=[keys["attacker"][1]])
    both = read_bundle(signed, keys=[keys["attacker"][1], keys["trusted"][1]])  # any trusted key will do
    assert both.authenticity.key == str(keys["trusted"][1])


def test_without_a_trusted_key_a_bundle_is_unauthenticated_and_says_so(signed, loaded, caplog):
    bundle = read_bundle(signed, keys=[])
    assert not bundle.authenticity.verified and bundle.authenticity.signed
    assert bundle.authenticity.describe().startswith("unauthenticated: no trusted key configured")
    with caplog.at_level("WARNING", logger="knnssd"):
        load_bundle(str(signed), model=loaded)
    assert "is unauthenticated" in caplog.text


@pytest.mark.parametrize("change", ["edit", "add", "add-git-file", "remove", "unsign", "garbage-signature"])
def test_a_changed_signed_bundle_is_refused(signed, keys, change):
    if change == "edit":  # even a consistent rewrite: the file and its checksum in the manifest
        policies = json.loads((signed / "policies.json").read_text())
        policies["low"]["threshold"] = 0.5
        (signed / "policies.json").write_text(json.dumps(policies))
        words = "files differ from the ones its signature covers"
    elif change == "add":
        (signed / "extra.py").write_text("print('hello')")
        words = "files differ from the ones its signature covers"
    elif change == "add-git-file":  # model-signing leaves .git* files out unless told not to
        (signed / ".gitattributes").write_text("* filter=anything")
        words = "files differ from the ones its signature covers"
    elif change == "remove":
        (signed / "anchors.json").unlink()
        words = "files differ from the ones its signature covers"
    elif change == "unsign":
        (signed / SIGNATURE_FILE).unlink()
        words = "is unsigned, and trusted keys are configured"
    else:
        (signed / SIGNATURE_FILE).write_text("{not json")
        words = "is damaged or not a model-signing signature"
    with pytest.raises(SignatureError, match=words):
        read_bundle(signed, keys=[keys["trusted"][1]])


def test_the_signature_is_checked_before_anything_is_parsed(signed, keys, monkeypatch):
    (signed / "manifest.json").write_text("{this is not JSON")  # would be "damaged" if it were parsed first
    with pytest.raises(SignatureError, match="files differ"):
        read_bundle(signed, keys=[keys["trusted"][1]])
    calls = []
    for reader in ("read_manifest", "_read_json", "read_anchors"):  # every reader of the bundle's own files
        monkeypatch.setattr(f"knnssd.bundle.reading.{reader}", lambda *a, **k: calls.append(a))
    (signed / "policies.json").write_text("{}")
    with pytest.raises(SignatureError):
        read_bundle(signed, keys=[keys["trusted"][1]])
    assert not calls


def test_trusted_keys_come_from_the_caller_else_the_environment(signed, keys, monkeypatch, tmp_path):
    trusted, attacker = str(keys["trusted"][1]), str(keys["attacker"][1])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, os.pathsep.join([attacker, trusted]))
    assert trusted_keys() == (Path(attacker), Path(trusted))
    assert read_bundle(signed).authenticity.key == trusted
    monkeypatch.setenv(TRUSTED_KEYS_ENV, attacker)
    with pytest.raises(SignatureError, match="not among the trusted"):
        read_bundle(signed)
    assert read_bundle(signed, keys=[trusted]).authenticity.verified  # the caller's keys replace the variable's
    assert not read_bundle(signed, keys=[]).authenticity.verified


@pytest.mark.parametrize("key, words", [("missing", "does not exist"), ("private", "is not a PEM public key"),
                                        ("text", "is not a PEM public key")])
def test_an_unusable_trusted_key_is_a_clear_error(keys, tmp_path, key, words):
    path = {"missing": tmp_path / "nope.pub", "private": keys["trusted"][0], "text": tmp_path / "t.pub"}[key]
    if key == "text":
        path.write_text("hello")
    with pytest.raises(SignatureError, match=words):
        trusted_keys([path])


# -- the attacks, with write access to the tracking store only ------------------------------------------------
@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A sqlite tracking store (what the attacker can write) with its artifacts beside it."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlartifacts, ./mlruns) lands here
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    return BundleRegistry(f"sqlite:///{tmp_path}/mlflow.db")


def attacker_bundle(loaded, tmp_path, keys, **overrides) -> Path:
    """A bundle the attacker wrote and (optionally) signed with their own key, in storage they control."""
    folder = tiny_bundle(loaded, tmp_path / f"evil-{uuid.uuid4().hex[:6]}" / "bundle", tag="evil", **overrides)
    sign_bundle(folder, keys["attacker"][0])
    return folder


def test_a_forged_source_with_a_matching_digest_tag_is_refused(store, loaded, tmp_path, keys):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    store.publish(tiny_bundle(loaded, tmp_path / "honest", tag="honest"), name, signing_key=keys["trusted"][0])
    evil = attacker_bundle(loaded, tmp_path, keys)
    database = sqlite3.connect(store.tracking_uri.removeprefix("sqlite:///"))  # the attacker's write access
    with database:
        database.execute("UPDATE model_versions SET source = ? WHERE name = ? AND version = 1", (str(evil), name))
    database.close()
    store.client.set_model_version_tag(name, "1", MANIFEST_TAG, manifest_digest(evil))
    attacked = load_bundle(f"{name}@v1", model=loaded, tracking_uri=store.tracking_uri, trusted_keys=[])
    assert attacked.bundle.manifest["calibration"]["tag"] == "evil"  # without a key, the forgery goes through
    with pytest.raises(SignatureError, match="not among the trusted"):
        load_bundle(f"{name}@v1", model=loaded, tracking_uri=store.tracking_uri, trusted_keys=[keys["trusted"][1]])


def test_an_alias_moved_back_to_a_version_signed_by_an_untrusted_key_is_refused(store, loaded, tmp_path, keys):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    store.publish(tiny_bundle(loaded, tmp_path / "old", tag="old"), name, signing_key=keys["attacker"][0])
    store.publish(tiny_bundle(loaded, tmp_path / "new", tag="new"), name, signing_key=keys["trusted"][0])
    store.set_alias(name, "production", 2)
    trusted = [keys["trusted"][1]]
    runtime = load_bundle(f"{name}@production", model=loaded, tracking_uri=store.tracking_uri, trusted_keys=trusted)
    assert runtime.bundle.manifest["calibration"]["tag"] == "new" and runtime.bundle.authenticity.verified
    assert store.client.get_model_version(name, "2").tags["signed"] == "true"
    store.client.set_registered_model_alias(name, "production", "1")  # the attacker moves the alias back
    with pytest.raises(SignatureError, match="not among the trusted"):
        load_bundle(f"{name}@production", model=loaded, tracking_uri=store.tracking_uri, trusted_keys=trusted)


def test_a_registered_manifest_naming_another_model_is_refused_before_any_model_loads(store, loaded, tmp_path, keys,
                                                                                      monkeypatch):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    store.publish(tiny_bundle(loaded, tmp_path / "honest", tag="honest"), name, signing_key=keys["trusted"][0])
    evil = attacker_bundle(loaded, tmp_path, keys, model_id="attacker/remote-code-model")
    (evil / SIGNATURE_FILE).unlink()  # unsigned this time
    run = store.client.create_run(store.client.get_experiment_by_name("knnssd-calibration").experiment_id)
    store.client.log_artifacts(run.info.run_id, str(evil), artifact_path="bundle")
    store.client.create_model_version(name, source=f"runs:/{run.info.run_id}/bundle", run_id=run.info.run_id,
                                      tags={MANIFEST_TAG: manifest_digest(evil)})  # v2, the newest
    loads = []
    monkeypatch.setattr("knnssd.bundle.runtime.load_model", lambda name, **kwargs: loads.append(name) or loaded)
    load_bundle(name, tracking_uri=store.tracking_uri, trusted_keys=[], allow_model_mismatch=True)
    assert loads == ["attacker/remote-code-model"]  # without a key, the manifest chooses the model
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["trusted"][1]))
    with pytest.raises(SignatureError, match="is unsigned"):
        load_bundle(name, tracking_uri=store.tracking_uri)
    assert loads == ["attacker/remote-code-model"]  # refused before any model was loaded
    assert load_bundle(f"{name}@v1", model=loaded, tracking_uri=store.tracking_uri).bundle.authenticity.verified


def test_publishing_signs_a_copy_and_the_cli_reports_the_signature(store, loaded, tmp_path, keys, capsys):
    from knnssd.cli import main

    name = f"tiny-{uuid.uuid4().hex[:6]}"
    folder = tiny_bundle(loaded, tmp_path / "b", tag="cli")
    store.publish(folder, name, signing_key=keys["trusted"][0])
    assert not (folder / SIGNATURE_FILE).exists()  # the calibration's own folder is left as it was
    cached = store.fetch(f"{name}@v1", keys=[keys["trusted"][1]])
    assert verify_signature(cached, [keys["trusted"][1]]).verified
    base = ["bundles", "show", f"{name}@v1", "--tracking-uri", store.tracking_uri]
    assert main(base + ["--trusted-key", str(keys["trusted"][1])]) == 0
    assert f"signature: signature verified with trusted key {keys['trusted'][1]}" in capsys.readouterr().out
    assert main(base) == 0
    assert "signature: unauthenticated: no trusted key configured" in capsys.readouterr().out
    assert main(base + ["--trusted-key", str(keys["attacker"][1])]) == 2
    assert "not among the trusted" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "cache")
    assert main(["keys", "generate", "--out", str(tmp_path / "cli-key")]) == 0
    assert (tmp_path / "cli-key.key").is_file() and (tmp_path / "cli-key.pub").is_file()
