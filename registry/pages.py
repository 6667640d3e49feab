"""What a bundle's MLflow run and registered version show a user comparing bundles in the MLflow UI.

- parameters: each domain's policy flattened, one knob a parameter (`policy.<domain>.kind`,
  `policy.<domain>.skip_set.attn`, `policy.<domain>.max_draft_tokens`, ...), so the compare view diffs them;
- a markdown description (the run's note and the version's description): the per-domain summary table.
"""

from __future__ import annotations

import json
from typing import Any

from knnssd.bundle import manifest_rows

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested dicts as dotted keys; lists and scalars as compact JSON text."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}", inner))
        return flat
    return {prefix: json.dumps(value, separators=(",", ":"))[:MAX_PARAM_CHARS]}


def policy_params(manifest: dict[str, Any]) -> dict[str, str]:
    """Every domain's policy (and each reference policy, e.g. the mix) as flat `policy.<name>.<knob>` params."""
    params: dict[str, str] = {}
    for domain in manifest["domains"]:
        params.update(flatten(f"policy.{domain['name']}", domain["policy"]))
    for name, reference in manifest.get("reference_policies", {}).items():
        params.update(flatten(f"policy.{name}", reference.get("policy", {})))
    params.update(flatten("policy.__fallback__", manifest["fallback_policy"]))
    return params


def _figure(metrics: dict[str, Any], key: str, digits: int) -> str:
    value = metrics.get(key)
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) else "-"


def summary_markdown(manifest: dict[str, Any], title: str) -> str:
    """A markdown description: what the bundle is, and one row per domain (policy and calibration figures)."""
    from knnssd.engine.policy import describe_policy  # torch comes with it: only when publishing

    lines = [f"**{title}**: KNN-SSD routing bundle for `{manifest['model_id']}` "
             f"(model hash `{manifest['model_hash'][:12]}`), {len(manifest['domains'])} domains, "
             f"created {manifest.get('created_at', '?')}.", "",
             "| domain | anchors | policy | predicted | confirmed | mean accepted | acceptance | trials | store tokens |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in manifest_rows(manifest).items():
        metrics = row["metrics"]
        lines.append(f"| {name} | {row['anchors'] or '-'} | `{describe_policy(row['policy'])}` | "
                     f"{_figure(metrics, 'predicted_speedup', 3)} | {_figure(metrics, 'speedup', 3)} | "
                     f"{_figure(metrics, 'mean_accepted_tokens', 2)} | "
                     f"{_figure(metrics, 'acceptance_rate', 2)} | {_figure(metrics, 'trials', 0)} | "
                     f"{row['store']['tokens'] if row.get('store') else '-'} |")
    lines += ["", f"Fallback beyond cosine distance {manifest['routing']['fallback_distance']:.4f}: "
                  f"`{describe_policy(manifest['fallback_policy'])}`. Predicted: the search's replayed and priced "
                  "speedup; confirmed: wall clock over plain decoding timed beside it, on more prompts. Rows in "
                  "parentheses are reference policies, never routed to. Store tokens: the domain's own greedy outputs "
                  "a suffix_tree +store policy drafts from (a reference's: the union of all)."]
    validation = manifest.get("calibration", {}).get("validation")
    if validation and validation.get("domains"):
        from knnssd.bundle.reports import format_validation

        lines += ["", "Held-out check:", "", "```", format_validation(validation), "```"]
    return "\n".join(lines)


def validation_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The held-out check as run metrics: heldout_own_wins/<domain> (1 or 0), heldout_speedup/<domain>/<policy>,
    and the median |predicted / wall clock - 1|."""
    validation = manifest.get("calibration", {}).get("validation") or {}
    metrics = {}
    for domain, row in validation.get("domains", {}).items():
        metrics[f"heldout_own_wins/{domain}"] = float(row["own_wins"])
        metrics.update({f"heldout_speedup/{domain}/{name}": float(value) for name, value in row["speedups"].items()})
    if validation.get("median_abs_prediction_error") is not None:
        metrics["heldout_median_abs_prediction_error"] = float(validation["median_abs_prediction_error"])
    return metrics


# A saved runs-table view of the experiment (MLflow's "shared view": an experiment tag named
# mlflow.sharedViewState.<key> holding the table's state as JSON), opened by `runs_table_path`. MLflow 3.17's UI
# opens every experiment on its GenAI pages, whatever the experiment's tags say, unless the URL asks for the
# model-training workflow; and its runs table shows no metric or parameter column until a user picks some.
SHARED_VIEW_KEY = "knnssd-bundles"
SHARED_VIEW_TAG = f"mlflow.sharedViewState.{SHARED_VIEW_KEY}"


# The view's columns, what a user came to compare first: per-domain speedups, then mean accepted tokens, then
# whether each domain's own policy won the held-out check, then the policies' kinds.
COLUMN_GROUPS = ("metrics.`speedup/", "metrics.`mean_accepted_tokens/", "metrics.`heldout_own_wins/",
                 "params.`policy.")


def view_columns(manifest: dict[str, Any]) -> list[str]:
    """The runs-table columns that compare bundles, in `COLUMN_GROUPS` order: per domain (and reference
    policy) the calibrated speedup, mean accepted tokens, the held-out check's verdict and the policy's kind."""
    names = [d["name"] for d in manifest["domains"]] + list(manifest.get("reference_policies", {}))
    columns = [f"metrics.`speedup/{name}`" for name in names]
    columns += [f"metrics.`mean_accepted_tokens/{name}`" for name in names]
    columns += [f"metrics.`heldout_own_wins/{d['name']}`" for d in manifest["domains"]]
    columns += [f"params.`policy.{name}.kind`" for name in names]
    return columns


def _group(column: str) -> int:
    return next((i for i, prefix in enumerate(COLUMN_GROUPS) if column.startswith(prefix)), len(COLUMN_GROUPS))


def shared_view(previous: str | None, manifest: dict[str, Any]) -> str:
    """The view's JSON: the columns it had (other bundles' domains stay) plus this bundle's, as selected
    columns and as the column order. The order matters: MLflow's runs table lists selected metric columns by
    name (`heldout_own_wins/...` before `speedup/...`) unless the view's `columnOrder` says otherwise."""
    try:
        state = json.loads(previous) if previous else {}
    except json.JSONDecodeError:
        state = {}
    merged = list(dict.fromkeys([*state.get("selectedColumns", []), *view_columns(manifest)]))
    columns = sorted(merged, key=_group)  # stable: each group keeps the order the bundles added its columns in
    return json.dumps({**state, "selectedColumns": columns, "columnOrder": columns})


def runs_table_path(experiment_id: str) -> str:
    """The UI path (after the server's address) of the experiment's runs table in the bundle view."""
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={SHARED_VIEW_KEY}"


def compare_path(experiment_id: str, run_ids: list[str]) -> str:
    """The UI path of MLflow's compare view of `run_ids` (parameters side by side, differences marked)."""
    runs = json.dumps(run_ids, separators=(",", ":"))
    return f"/#/compare-runs?runs={runs}&experiments={json.dumps([experiment_id])}&workflowType=machine_learning"
