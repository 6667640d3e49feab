"""What a user sees when comparing bundles in the MLflow UI, checked in a real headless Chromium against a real
MLflow server: the experiment's runs table in the bundle view lists both versions' runs with per-domain
speedup columns, and MLflow's compare view shows their policies' parameters side by side.

Needs Debian's `chromium` package (.ci/run installs it); skipped, with the reason, where it is absent. With
KNNSSD_UI_SCREENSHOTS=FOLDER it also saves the two pages' screenshots there (the README's come from
`KNNSSD_UI_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_mlflow_ui.py`).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from registry.mlflow_store import BundleRegistry
from registry.pages import compare_path, runs_table_path
from tests.bundles import TINY_POLICIES, loaded, tiny_bundle  # noqa: F401 (fixture)
from tests.services import tracking_uri  # noqa: F401 (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: `apt-get install chromium` (Debian's package) enables "
                             "the MLflow UI test")
BROWSER = [CHROMIUM or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=20000", "--window-size=1500,900"]


def page_dom(url: str) -> str:
    """The page's DOM after the React app rendered (dumped once the virtual time ran out)."""
    return subprocess.run([*BROWSER, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def page_text(url: str) -> str:
    """The page's visible text after the React app rendered."""
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page_dom(url), flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def header_order(url: str) -> list[str]:
    """The runs table's column ids as the grid shows them, left to right: ag-grid places header cells by
    `aria-colindex`, which is not their order in the DOM."""
    cells = []
    for tag in re.findall(r"<div[^>]*\bcol-id=[^>]*>", page_dom(url)):
        column, index = re.search(r'col-id="([^"]*)"', tag), re.search(r'aria-colindex="(\d+)"', tag)
        if column and index and "ag-header-cell" in tag:
            cells.append((int(index.group(1)), html.unescape(column.group(1))))
    return [column for _, column in sorted(set(cells))]


def screenshot(url: str, path: Path) -> Path:
    subprocess.run([*BROWSER, f"--screenshot={path}", url], capture_output=True, timeout=180, check=True)
    assert path.is_file() and path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_bundle_versions_compare_in_the_mlflow_ui(tracking_uri, loaded, tmp_path, monkeypatch):  # noqa: F811
    if not tracking_uri.startswith("http"):
        pytest.skip("the UI test needs an MLflow server")
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    registry = BundleRegistry(tracking_uri)
    name, experiment = f"ui-{uuid.uuid4().hex[:6]}", f"knnssd-ui-test-{uuid.uuid4().hex[:6]}"
    first = registry.publish(tiny_bundle(loaded, tmp_path / "b1", tag="v1"), name, experiment=experiment)
    lookup = {**TINY_POLICIES, "low": {"kind": "prompt_lookup", "max_ngram": 2, "min_ngram": 1, "max_draft_tokens": 6}}
    second = registry.publish(tiny_bundle(loaded, tmp_path / "b2", tag="v2", policies=lookup,
                                          metrics={"low": {"speedup": 1.27, "mean_accepted_tokens": 1.8},
                                                   "high": {"speedup": 0.95}}), name, experiment=experiment)
    assert first.experiment_id == second.experiment_id

    runs_url = tracking_uri.rstrip("/") + runs_table_path(first.experiment_id)
    text = page_text(runs_url)
    assert "Overview" not in text.split("Run Name")[0][-400:]  # the runs table, not the GenAI overview
    for expected in (f"{name}@v1", f"{name}@v2", "speedup/low", "speedup/high", "policy.low.kind", "1.27"):
        assert expected in text, expected
    compare_url = tracking_uri.rstrip("/") + compare_path(first.experiment_id, [first.run_id, second.run_id])
    text = page_text(compare_url)
    assert "Comparing 2 Runs" in text
    for expected in (f"{name}@v1", f"{name}@v2", "policy.low.kind", '"prompt_lookup"', '"layer_skip"',
                     "policy.low.max_ngram", "manifest_sha256"):
        assert expected in text, expected

    # a bundle with a held-out check: the per-domain speedups come before its heldout_own_wins flags
    from pipeline.validation import validation_table
    from tests.test_validation import result

    policies = {"low": TINY_POLICIES["low"], "high": TINY_POLICIES["high"]}
    validation = validation_table([result("low", {"low": 1.2, "high": 1.0}), result("high", {"low": 1.1, "high": 1.0})],
                                  policies, {"low": "low", "high": "high"})
    third = registry.publish(tiny_bundle(loaded, tmp_path / "b3", tag="v3", calibration={"tag": "v3",
                                                                                          "validation": validation}),
                             name, experiment=experiment)
    assert third.experiment_id == first.experiment_id
    assert f"{name}@v3" in page_text(runs_url)
    shown = header_order(runs_url)
    order = [next((i for i, c in enumerate(shown) if column in c), -1)
             for column in ("speedup/low", "speedup/high", "mean_accepted_tokens/low", "heldout_own_wins/low")]
    shots = [screenshot(runs_url, tmp_path / "mlflow-runs.png"), screenshot(compare_url, tmp_path / "mlflow-compare.png")]
    keep = os.environ.get("KNNSSD_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(keep) / shot.name)
    assert -1 not in order and order == sorted(order), shown  # speedups first, as the view lists them
    assert all("speedup/" in column for column in [c for c in shown if c.startswith("metrics.")][:2]), shown
