"""Reporting, in one place: CSV tables and bar charts, for the evaluation (`pipeline/report.py`) and for the
bundle pages in MLflow (`registry/`). matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

DOMAIN_METRICS = ("speedup", "predicted_speedup", "confirmed_speedup", "mean_accepted_tokens", "acceptance_rate",
                  "skip_ratio", "trials", "mismatch_rate")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """`rows` (dicts with the same keys, in order) as a CSV file with a header."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


# (title, categories, {series: values}) or with a fourth item, {series: [(low, high) per category]}: error bars
Panel = tuple[Any, ...]


def bar_chart(path: Path, panels: Sequence[Panel], ylabel: str, highlight: str | None = None) -> Path:
    """Grouped bars, one panel per entry of `panels` stacked vertically, a dashed line at 1.0 (plain decoding).

    Each panel is (title, categories, {series name: one value per category}[, {series name: (low, high) per
    category}]), the optional intervals drawn as error bars; the series named `highlight` gets a black edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = max(5.0, min(13.0, 1.2 + 0.35 * max(len(p[1]) * len(p[2]) for p in panels)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.6 * len(panels)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, panel in zip(axes[:, 0], panels):
        title, categories, series = panel[:3]
        intervals = panel[3] if len(panel) > 3 else {}
        width = 0.8 / len(series)
        for m, (name, values) in enumerate(series.items()):
            xs = [i + (m - (len(series) - 1) / 2) * width for i in range(len(categories))]
            bounds = intervals.get(name)
            yerr = None if bounds is None else [[v - low for v, (low, _) in zip(values, bounds)],
                                                [high - v for v, (_, high) in zip(values, bounds)]]
            ax.bar(xs, list(values), width, label=name, color=colours(m % 20), yerr=yerr, capsize=2,
                   error_kw={"elinewidth": 0.8}, edgecolor="black" if name == highlight else None)
        ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(categories)), list(categories), rotation=20)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_bundle_reports(manifest: dict[str, Any], folder: Path) -> list[Path]:
    """A bundle's per-domain table (domains.csv) and calibrated speedup per domain (speedup.png)."""
    from knnssd.engine.policy import describe_policy

    rows = [{"domain": d["name"], "anchors": d["anchors"], "policy": describe_policy(d["policy"]),
             **{k: d["metrics"].get(k, "") for k in DOMAIN_METRICS}} for d in manifest["domains"]]
    table = write_csv(rows, folder / "domains.csv")
    chart = bar_chart(folder / "speedup.png",
                      [(f"{manifest['model_id']}: calibrated speedup per domain", [r["domain"] for r in rows],
                        {"speedup": [float(r["speedup"] or 0) for r in rows]})],
                      ylabel="speedup over plain decoding")
    paths = [table, chart]
    validation = manifest.get("calibration", {}).get("validation")
    if validation and validation.get("domains"):
        held = [{"domain": domain, "prompts": row["prompts"], "own_wins": row["own_wins"],
                 **{f"speedup.{name}": value for name, value in row["speedups"].items()},
                 **{f"predicted.{name}": value for name, value in row["predicted_speedups"].items()}}
                for domain, row in validation["domains"].items()]
        paths.append(write_csv(held, folder / "held_out.csv"))
    return paths


def format_validation(table: dict[str, Any]) -> str:
    """The held-out table as printed at the end of calibration and by `knnssd bundles show`."""
    domains = table["domains"]
    if not domains:
        return "held-out check: no domains"
    names = list(next(iter(domains.values()))["speedups"])
    width = max(9, *(len(n) + 2 for n in names))
    header = f"{'held-out on':<16}{'prompts':>8}" + "".join(f"{n:>{width}}" for n in names) + "  own policy wins?"
    lines = [header, "-" * len(header)]
    for domain, row in domains.items():
        cells = "".join(f"{row['speedups'][n]:>{width}.3f}" for n in names)
        verdict = "yes" if row["own_wins"] else f"no ({row['best_other']} {row['best_other_speedup']:.3f})"
        lines.append(f"{domain:<16}{row['prompts']:>8}{cells}  {verdict}")
    wins = sum(row["own_wins"] for row in domains.values())
    error = table.get("median_abs_prediction_error")
    lines.append(f"columns: the policy of each domain (and the mix study's), wall-clock speedup over plain decoding "
                 f"on the row's held-out prompts. Own policy wins in {wins}/{len(domains)} domains."
                 + (f" Predicted vs wall clock: median |error| {error:.1%}." if error is not None else ""))
    return "\n".join(lines)

