"""What pyproject.toml claims is true: every import declared once, the Python floor what the dependencies need,
the license file the declared one, and loading a bundle by registry reference needing only the `registry` extra."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import uuid

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from registry.mlflow_store import BundleRegistry
from tests.bundles import loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.conftest import REPO_ROOT
from tests.services import tracking_uri  # noqa: F401 (fixture)

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
SHIPPED = ("knnssd", "registry", "pipeline", "jobs")


def requirements() -> dict[str, list[Requirement]]:
    """{"core" or an extra: its requirements}, the extras' references to knnssd itself left out."""
    groups = {"core": PROJECT["dependencies"], **PROJECT["optional-dependencies"]}
    return {group: [r for r in map(Requirement, found) if r.name != "knnssd"] for group, found in groups.items()}


def test_each_dependency_is_declared_once():
    names = [req.name.lower() for found in requirements().values() for req in found]
    assert sorted(names) == sorted(set(names)), [name for name in set(names) if names.count(name) > 1]


def test_every_third_party_import_is_declared():
    """Every module that the shipped code imports, wherever the import stands, comes from a declared distribution
    (or one the declared ones depend on at a version we pin: mlflow's own)."""
    declared = {req.name.lower().replace("_", "-") for found in requirements().values() for req in found}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for package in SHIPPED:
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top in SHIPPED or top in sys.stdlib_module_names or top == "tests":
                        continue
                    dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                    if not dists & declared:
                        missing.setdefault(top, str(path.relative_to(REPO_ROOT)))
    assert not missing, f"imported, not declared in pyproject.toml: {missing}"


def test_the_python_floor_is_what_the_dependencies_need():
    floor = SpecifierSet(PROJECT["requires-python"])
    lowest = re.fullmatch(r">=(\d+)\.(\d+)", PROJECT["requires-python"])
    assert lowest, "requires-python is written as >=3.N"
    for req in requirements()["core"]:
        needs = importlib.metadata.metadata(req.name).get("Requires-Python")
        if needs:  # the installed, pinned dependency accepts the lowest Python we claim
            assert SpecifierSet(needs).contains(f"{lowest[1]}.{lowest[2]}.0"), f"{req.name} needs Python {needs}"
    assert floor.contains(f"{sys.version_info.major}.{sys.version_info.minor}.0")


def test_the_license_file_is_the_declared_license():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert " ".join(text.split()[:4]) == "Apache License Version 2.0,"
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_the_registry_extra_is_mlflow_alone():
    assert [req.name for req in requirements()["registry"]] == ["mlflow"]
    assert "knnssd[registry]" in PROJECT["optional-dependencies"]["calibrate"]


BLOCKER = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):  # as if only the core and the registry extra were installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "optuna", "pipeline", "jobs"}:
            raise ImportError(f"{name} is not installed")
sys.meta_path.insert(0, Absent())
"""


def test_loading_by_alias_needs_only_the_registry_extra(tracking_uri, loaded, tmp_path):
    registry = BundleRegistry(tracking_uri)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    registry.publish(tiny_bundle(loaded, tmp_path / "b", tag="aliased"), name)
    registry.set_alias(name, "production", 1)
    code = BLOCKER + f"""
from knnssd.bundle.sources import fetch_bundle
from knnssd.bundle import read_bundle
from knnssd.cli import main
bundle = read_bundle(fetch_bundle({name + '@production'!r}, {tracking_uri!r}), keys=())
assert bundle.manifest["calibration"]["tag"] == "aliased"
assert main(["bundles", "alias", {name + '@v1'!r}, "staging", "--tracking-uri", {tracking_uri!r}]) == 0
assert main(["bundles", "show", {name + '@staging'!r}, "--tracking-uri", {tracking_uri!r}]) == 0
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"ray", "optuna", "pipeline", "jobs"}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={"KNNSSD_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
