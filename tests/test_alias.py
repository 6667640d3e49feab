"""`knnssd bundles alias REF ALIAS [--delete]` against a real MLflow tracking server: promote a version, resolve
it by alias, move the alias, delete it; a bundle that does not verify against the trusted keys is never promoted;
bad input gets one `error: ... (fix: ...)` line."""

from __future__ import annotations

import uuid

import pytest

from knnssd.bundle.signing import TRUSTED_KEYS_ENV, generate_key_pair
from knnssd.bundle.sources import fetch_bundle
from knnssd.cli import main
from registry.mlflow_store import BundleRegistry
from tests.bundles import loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.services import tracking_uri  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {"trusted": generate_key_pair(root / "release"), "other": generate_key_pair(root / "other")}


@pytest.fixture(scope="module")
def published(tracking_uri, loaded, tmp_path_factory, keys):
    """A bundle name with v1 (tag one, signed by the trusted key) and v2 (tag two, unsigned)."""
    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("bundles")
    registry.publish(tiny_bundle(loaded, root / "one", tag="one"), name, signing_key=keys["trusted"][0])
    registry.publish(tiny_bundle(loaded, root / "two", tag="two"), name)
    return name


def tag_of(ref: str, tracking_uri: str) -> str:
    import json

    folder = fetch_bundle(ref, tracking_uri)
    return json.loads((folder / "manifest.json").read_text())["calibration"]["tag"]


def alias(*args: str, tracking_uri: str) -> int:
    return main(["bundles", "alias", *args, "--tracking-uri", tracking_uri])


def test_promote_resolve_move_and_delete(published, tracking_uri, keys, capsys):
    name, trusted = published, str(keys["trusted"][1])
    assert alias(f"{name}@v1", "production", "--trusted-key", trusted, tracking_uri=tracking_uri) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"alias production -> {name} v1"
    assert f"signature verified with trusted key {trusted}" in out
    assert tag_of(f"{name}@production", tracking_uri) == "one"
    assert main(["bundles", "show", f"{name}@production", "--tracking-uri", tracking_uri,
                 "--trusted-key", trusted]) == 0
    assert f"bundle {name}@production" in capsys.readouterr().out

    # moved to v2 (unsigned; no trusted key configured: promoted unauthenticated, as loading it would be)
    assert alias(f"{name}@v2", "production", tracking_uri=tracking_uri) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"alias production -> {name} v2 (was v1)" and "unauthenticated" in out
    assert tag_of(f"{name}@production", tracking_uri) == "two"
    # an alias as REF promotes the version it points to
    assert alias(f"{name}@production", "staging", tracking_uri=tracking_uri) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"alias staging -> {name} v2"
    rows = BundleRegistry(tracking_uri).versions(name)
    assert [row["aliases"] for row in rows] == [[], ["production", "staging"]]

    # delete: by the bare name, or by the version it points to; never an alias that points elsewhere
    assert alias(f"{name}@v1", "staging", "--delete", tracking_uri=tracking_uri) == 2
    assert "points to v2, not v1" in capsys.readouterr().err
    assert alias(name, "production", "--delete", tracking_uri=tracking_uri) == 0
    assert capsys.readouterr().out.strip() == f"deleted alias production (was -> {name} v2)"
    assert alias(f"{name}@v2", "staging", "--delete", tracking_uri=tracking_uri) == 0
    capsys.readouterr()
    for gone in ("production", "staging"):
        with pytest.raises(Exception, match=f"has no alias '{gone}'"):
            fetch_bundle(f"{name}@{gone}", tracking_uri)
        assert main(["bundles", "show", f"{name}@{gone}", "--tracking-uri", tracking_uri]) == 2
        assert f"has no alias '{gone}'" in capsys.readouterr().err
    assert alias(name, "production", "--delete", tracking_uri=tracking_uri) == 2
    assert "no alias 'production' to delete" in capsys.readouterr().err


def test_a_bundle_that_does_not_verify_is_never_promoted(published, tracking_uri, keys, capsys, monkeypatch):
    name = published
    registry = BundleRegistry(tracking_uri)
    before = [row["aliases"] for row in registry.versions(name)]
    # v2 is unsigned; v1 is signed by another key than the one trusted: both refused, by flag or environment
    assert alias(f"{name}@v2", "trusted-only", "--trusted-key", str(keys["trusted"][1]),
                 tracking_uri=tracking_uri) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # MLflow may draw a download bar first
    assert last.startswith("error: ") and "(fix: " in last and "unsigned" in last
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["other"][1]))
    assert alias(f"{name}@v1", "trusted-only", tracking_uri=tracking_uri) == 2
    assert "not among the trusted" in capsys.readouterr().err
    assert [row["aliases"] for row in registry.versions(name)] == before


@pytest.mark.parametrize("ref, name, words", [
    ("{name}@v9", "production", "has no version 9"),
    ("{name}", "v3", "reads as a version"),
    ("{name}", "V3", "reads as a version"),
    ("{name}", "latest", "reads as a version"),
    ("{name}", "pro.d", "not a valid alias name"),
    ("no-such-bundle-{name}", "production", "no bundle named"),
    ("./some/folder", "production", "only registry versions carry aliases"),
    ("{name}@", "production", "malformed bundle reference"),
])
def test_bad_input_is_one_error_line_with_a_fix(published, tracking_uri, capsys, ref, name, words):
    assert alias(ref.format(name=published), name, tracking_uri=tracking_uri) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "(fix: " in err and "Traceback" not in err
    assert err.count("\n") == 1
