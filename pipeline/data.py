"""Calibration data: Spec-Bench JSONL, generic JSONL or Parquet, or the built-in demo prompts, as an Arrow
table with columns domain, prompt, split ("calibration" / "held_out").

The split is seeded per domain and written with the table, so evaluation reads the same held-out prompts.

Held-out integrity: a calibration stores the model's own output for each calibration prompt, so a held-out prompt
whose text is also a calibration prompt would look its own future up. The split therefore keeps each prompt text
(compared after whitespace normalisation, `normalise_prompt`) once per domain (the first occurrence in file
order: a duplicate can never straddle the split), and refuses a text that appears in two domains (after --merge),
naming it. `data_fingerprint` hashes the split table; calibration records it in the bundle and evaluation
(`check_fingerprint`) refuses a file whose split differs from the one the bundle was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from knnssd.demo_prompts import DEMO_PROMPTS
from knnssd.errors import KnnSsdError

CALIBRATION, HELD_OUT = "calibration", "held_out"
MIN_CALIBRATION = 1  # calibration prompts a domain needs: its search scores on the ones there are
SPEC_BENCH_MT_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they are split.

    path: None for the built-in demo set; a .jsonl (Spec-Bench rows with `category` and `turns`, or rows with
    the domain and prompt columns) or .parquet file otherwise. columns maps our names (domain, prompt) to the
    file's. merge: domain renames, e.g. {"coding": "chat"}; domains: keep only these (after merging).
    """

    path: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    merge: dict[str, str] = field(default_factory=dict)
    domains: tuple[str, ...] = ()
    held_out_fraction: float = 0.25
    seed: int = 0
    max_per_domain: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.columns) - {"domain", "prompt"}
        if unknown:
            raise KnnSsdError(f"unknown column mapping keys {sorted(unknown)}",
                              fix="map only domain and prompt, e.g. --columns domain=category,prompt=text")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise KnnSsdError(f"the held-out fraction must be in (0, 1), got {self.held_out_fraction}",
                              fix="use e.g. --held-out-fraction 0.25: every domain keeps at least one prompt "
                                  "out of calibration for the final check and the evaluation")
        if self.max_per_domain is not None and self.max_per_domain < 2:
            raise KnnSsdError(f"--max-per-domain must be >= 2, got {self.max_per_domain}",
                              fix="keep at least one calibration and one held-out prompt per domain")


def _rows_from_jsonl(path: Path, config: DataConfig) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnnSsdError(f"{path} line {number} is not JSON ({exc.msg})", fix="fix or remove that line") from None
        rows.append(_pick(record, config, f"{path} line {number}"))
    return rows


def _pick(record: dict, config: DataConfig, where: str) -> tuple[str, str]:
    """(domain, prompt) of one record: mapped columns, else domain/prompt, else Spec-Bench's category/turns."""
    domain_key = config.columns.get("domain") or ("domain" if "domain" in record else "category")
    prompt_key = config.columns.get("prompt") or ("prompt" if "prompt" in record else "turns")
    for key in (domain_key, prompt_key):
        if key not in record:
            raise KnnSsdError(f"{where} has no column {key!r} (columns: {', '.join(sorted(record))})",
                              fix="map the columns, e.g. --columns domain=category,prompt=text")
    prompt = record[prompt_key]
    if isinstance(prompt, list):  # Spec-Bench: the first turn is the prompt
        prompt = prompt[0] if prompt else ""
    return str(record[domain_key]), str(prompt)


def _rows_from_parquet(path: Path, config: DataConfig) -> list[tuple[str, str]]:
    table = pq.read_table(path)
    domain_key = config.columns.get("domain", "domain")
    prompt_key = config.columns.get("prompt", "prompt")
    for key in (domain_key, prompt_key):
        if key not in table.column_names:
            raise KnnSsdError(f"{path} has no column {key!r} (columns: {', '.join(table.column_names)})",
                              fix="map the columns, e.g. --columns domain=category,prompt=text")
    return list(zip(map(str, table[domain_key].to_pylist()), map(str, table[prompt_key].to_pylist())))


def read_prompts(config: DataConfig) -> list[tuple[str, str]]:
    """(domain, prompt) rows from the configured source, merged and filtered, empty prompts dropped."""
    if config.path is None:
        rows = list(DEMO_PROMPTS)
    else:
        path = Path(config.path)
        if not path.is_file():
            raise KnnSsdError(f"data file {path} does not exist", fix="pass --data PATH of a .jsonl or .parquet file")
        if path.suffix == ".parquet":
            rows = _rows_from_parquet(path, config)
        else:
            rows = _rows_from_jsonl(path, config)
        if not rows:
            raise KnnSsdError(f"data file {path} holds no prompts", fix="give a file with one prompt per row")
    rows = [(config.merge.get(domain, domain), prompt) for domain, prompt in rows if prompt.strip()]
    if config.domains:
        present = sorted({domain for domain, _ in rows})
        missing = [d for d in config.domains if d not in present]
        if missing:
            raise KnnSsdError(f"domains {missing} not in the data", fix=f"choose from: {', '.join(present)}")
        rows = [row for row in rows if row[0] in config.domains]
    return rows


def normalise_prompt(text: str) -> str:
    """The text two prompts are compared by: runs of whitespace as one space, none at either end."""
    return " ".join(text.split())


def unique_prompts(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Each domain's prompt texts (domains in order of first appearance), each normalised text once (its first
    occurrence, as written). A text in two domains is refused, naming it: it could be held out in one domain
    while its own output is stored for the other (and in the union store every domain's policies may draft from)."""
    by_domain: dict[str, dict[str, str]] = {}
    owner: dict[str, str] = {}
    clashes: list[tuple[str, str, str]] = []
    for domain, prompt in rows:
        key = normalise_prompt(prompt)
        first = owner.setdefault(key, domain)
        if first != domain:
            clashes.append((prompt, first, domain))
            continue
        by_domain.setdefault(domain, {}).setdefault(key, prompt)
    if clashes:
        prompt, first, other = clashes[0]
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise KnnSsdError(
            f"the prompt {shown!r} appears in domains {first!r} and {other!r}"
            + (f" ({len(clashes)} prompts appear in more than one domain)" if len(clashes) > 1 else ""),
            fix="keep each prompt in one domain (edit the file, or merge the domains with --merge): a prompt in "
                "two domains could be held out in one while its own output is stored for the other")
    return {domain: list(texts.values()) for domain, texts in by_domain.items()}


def split_table(rows: list[tuple[str, str]], config: DataConfig,
                min_calibration: int = MIN_CALIBRATION) -> pa.Table:
    """Seeded per-domain split; every domain needs `min_calibration` calibration prompts and one held out.
    A search scores its trials on the calibration prompts there are, up to --prompts-per-trial (each traced from
    the domain's store, `pipeline.tasks.search_workload`), so the minimum is MIN_CALIBRATION, not that flag.

    Duplicate texts are kept once per domain and a text in two domains is refused (`unique_prompts`); on data
    without duplicates this is the plain seeded shuffle of each domain's prompts in file order."""
    domains, prompts, splits = [], [], []
    for domain, texts in unique_prompts(rows).items():
        texts = texts[: config.max_per_domain] if config.max_per_domain else texts
        order = list(range(len(texts)))
        random.Random(f"{config.seed}-{domain}").shuffle(order)
        held = max(1, round(len(texts) * config.held_out_fraction))
        if len(texts) - held < min_calibration:
            raise KnnSsdError(
                f"domain {domain!r} has {len(texts)} distinct prompts: too few for {min_calibration} calibration "
                f"prompts plus {held} held out",
                fix="add prompts, or leave the domain out with --domains")
        for rank, i in enumerate(order):
            domains.append(domain)
            prompts.append(texts[i])
            splits.append(HELD_OUT if rank < held else CALIBRATION)
    return pa.table({"domain": domains, "prompt": prompts, "split": splits})


def data_fingerprint(table: pa.Table) -> str:
    """sha256 (16 hex digits) over every (domain, prompt, split) row: which prompts calibrated, and how split."""
    digest = hashlib.sha256()
    for row in zip(*(table[c].to_pylist() for c in ("domain", "prompt", "split"))):
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()[:16]


def check_fingerprint(table: pa.Table, recorded: str | None, source: str) -> None:
    """Refuse evaluation data whose split `table` is not the one the bundle was calibrated on.

    table: the split table rebuilt from `source` with the bundle's data settings, restricted to the bundle's
    domains; recorded: the fingerprint the bundle's calibration recorded (its manifest's
    calibration.provenance["data.fingerprint"]); None is not checked here (the caller decides). A different
    fingerprint means another file or another split: a prompt held out now may have been a calibration prompt
    whose own output sits in a store."""
    found = data_fingerprint(table)
    if recorded is not None and found != recorded:
        raise KnnSsdError(
            f"the evaluation data {source} splits to fingerprint {found}, but the bundle was calibrated on data "
            f"with fingerprint {recorded}: its held-out prompts are not the ones calibration held out, and a "
            "prompt's own output may sit in a store",
            fix="pass the exact file the bundle was calibrated on (--data, with nothing added, removed or "
                "changed), or re-calibrate on this one")


def load_calibration_table(config: DataConfig, min_calibration: int = MIN_CALIBRATION) -> pa.Table:
    return split_table(read_prompts(config), config, min_calibration)


def prompts_of(table: pa.Table, domain: str, split: str) -> list[str]:
    mask = pc.and_(pc.equal(table["domain"], domain), pc.equal(table["split"], split))
    rows = table.filter(mask)
    return rows["prompt"].to_pylist()


def domains_of(table: pa.Table) -> list[str]:
    return list(dict.fromkeys(table["domain"].to_pylist()))
