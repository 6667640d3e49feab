"""What a calibration records and prints: the data's fingerprint and provenance, the run's flat MLflow parameters,
and the summary table."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from knnssd.engine.policy import describe_policy
from knnssd.bundle.reports import format_validation
from pipeline.data import DataConfig, data_fingerprint  # the fingerprint evaluation checks
from pipeline.reduce import ReduceConfig
from pipeline.space import SearchConfig
from pipeline.tasks import ModelSpec


def provenance(table: pa.Table, searches: list[dict[str, Any]]) -> dict[str, Any]:
    """What a comparison of bundles needs besides the settings: the data's fingerprint, where the trials ran
    (device, dtype, torch threads per worker) and the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    first = searches[0]
    return {"data.fingerprint": data_fingerprint(table), "data.prompts": table.num_rows,
            "worker.device": first.get("device"), "worker.dtype": first.get("dtype"),
            "worker.torch_threads": first.get("threads"),
            **{f"version.{p}": installed(p) for p in ("knnssd", "torch", "transformers", "optuna", "ray", "mlflow",
                                                     "faiss-cpu")}}


def flat_params(model: ModelSpec, data: DataConfig, search: SearchConfig, reduce: ReduceConfig) -> dict[str, Any]:
    """The run's MLflow parameters: model, data, search budget, k and the rest, flattened."""
    params: dict[str, Any] = {"model": model.name, "chat": model.chat, "data": data.path or "built-in demo prompts"}
    for prefix, part in (("search", search), ("reduce", reduce)):
        for key, value in asdict(part).items():
            if isinstance(value, dict):  # the search's seed configs: one parameter per field
                params.update({f"{prefix}.{key}.{k}": v for k, v in value.items()})
            else:
                params[f"{prefix}.{key}"] = value
    params.update({"data.held_out_fraction": data.held_out_fraction, "data.seed": data.seed,
                   "data.domains": ",".join(data.domains) or "all"})
    return params


def summary_table(domains: tuple[dict[str, Any], ...], validation: dict[str, Any]) -> str:
    """Per domain: the policy chosen, its predicted and confirmed (wall-clock) speedup (the searched policy's
    figures even when a domain falls back to plain decoding because that policy was slower), then the
    held-out check."""
    header = f"{'domain':<16}{'predicted':>10}{'confirmed':>10}{'mean acc':>10}{'trials':>8}{'mismatch':>9}  policy"
    lines = [header, "-" * (len(header) + 40)]
    for row in domains:
        m = row["metrics"]
        chosen = describe_policy(row["policy"])
        if "searched_policy" in m:
            chosen += f" (searched {describe_policy(json.loads(m['searched_policy']))} was slower than plain)"
        lines.append(f"{row['domain']:<16}{m['predicted_speedup']:>10.3f}{m.get('searched_speedup', m['speedup']):>10.3f}"
                     f"{m['mean_accepted_tokens']:>10.2f}{int(m['trials']):>8}{m['mismatch_rate']:>9.2f}  {chosen}")
    lines.append("predicted: replayed and priced on the search prompts; confirmed: wall clock against plain "
                 "decoding on more prompts; mismatch: share of prompts whose tokens differed from plain decoding")
    lines += ["", "confirmation (the best predicted candidate is kept unless another is faster beyond the spread):"]
    lines += [f"  {row['domain']}: {row['metrics']['confirmation']}" for row in domains
              if "confirmation" in row["metrics"]]
    return "\n".join(lines) + "\n\n" + format_validation(validation)
