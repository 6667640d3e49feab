"""A bundle's per-domain warm successor tables (schema 4): checking, writing and listing them.

    successors/<i>.npy   domain i's table, a little-endian int32 array (vocab, k), k <= MAX_SUCCESSORS: row t the
                         model's top successor ids of token t, best first, -1 where it has none; the manifest's
                         "successors" lists {domain, file, vocab, k, bytes} for each (named by the domain's
                         index, like stores/<i>.npy)

A table is built at calibration's store stage from the model's successors over the domain's store outputs
(`pipeline.successors`); a suffix-tree policy with use_warm starts each generation's recycled successors from its
domain's table (`knnssd.engine.drafters.recycled.SuccessorTable`). The mix reference and the fallback start from
the domains' tables merged in domain order (`SuccessorTable.merged`, derived at load, never written). Tables are
bounded: at most MAX_SUCCESSOR_VOCAB rows each, checked from the manifest before any table file is hashed or read
(`knnssd.bundle.reading.successor_entries`: the declared sizes, and a file no larger than they allow), and again
on the array read (`read_successors`: dtype, shape, ids in -1..vocab-1; the runtime checks vocab against the
model's). Schema 2 and 3 bundles have no tables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from knnssd.errors import BundleError, KnnSsdError

SUCCESSORS_DIR = "successors"
MAX_SUCCESSORS = 8  # knnssd.engine.drafters.recycled.MAX_SUCCESSORS (not imported: this module needs no torch)
MAX_SUCCESSOR_VOCAB = 300_000  # rows of one table: 300_000 x 8 int32 = 9.6 MB
SUCCESSOR_FIELDS = ("vocab", "k", "bytes")  # a manifest successors row's sizes


def check_successors(table: Any, what: str, error: type[KnnSsdError] = KnnSsdError) -> None:
    """A table must be a (vocab, k) int32 array, 1 <= vocab <= MAX_SUCCESSOR_VOCAB, 1 <= k <= MAX_SUCCESSORS,
    of ids in -1..vocab-1."""
    if not isinstance(table, np.ndarray) or table.dtype != np.int32 or table.ndim != 2:
        described = f"{table.dtype} {table.shape}" if isinstance(table, np.ndarray) else type(table).__name__
        raise error(f"{what} is {described}, not a 2-D int32 array (vocab, k)",
                    fix="build it with knnssd.engine.drafters.SuccessorTable (its .table)")
    vocab, k = table.shape
    if not 1 <= vocab <= MAX_SUCCESSOR_VOCAB or not 1 <= k <= MAX_SUCCESSORS:
        raise error(f"{what} has shape ({vocab}, {k}): need 1..{MAX_SUCCESSOR_VOCAB} rows of 1..{MAX_SUCCESSORS} "
                    "successors", fix="build it for the model's vocabulary with at most 8 successors per token")
    if int(table.min()) < -1 or int(table.max()) >= vocab:
        raise error(f"{what} holds ids outside -1..{vocab - 1} (its vocabulary)",
                    fix="use -1 for an empty entry and token ids below the table's row count")


def check_spec_successors(successors: dict[str, np.ndarray], domains: Sequence[str]) -> None:
    """The tables of a bundle about to be written: {domain: (vocab, k) int32} for some of `domains`."""
    if set(successors) - set(domains):
        raise BundleError(f"successor tables for {sorted(set(successors) - set(domains))}, which are not domains",
                          fix="give tables only for the bundle's domains (the merged one is derived at load)")
    for domain, table in successors.items():
        check_successors(table, f"the successor table of domain {domain!r}", BundleError)


def successor_entry(domain: str, index: int, table: np.ndarray, folder: Path) -> dict[str, Any]:
    """The manifest's row for domain `index`'s table, written to folder/successors/<index>.npy now."""
    name = f"{SUCCESSORS_DIR}/{index}.npy"
    (folder / SUCCESSORS_DIR).mkdir(exist_ok=True)
    np.save(folder / name, table.astype("<i4"), allow_pickle=False)
    return {"domain": domain, "file": name, "vocab": int(table.shape[0]), "k": int(table.shape[1]),
            "bytes": (folder / name).stat().st_size}


def successor_files(manifest: dict[str, Any]) -> list[str]:
    """The table files a manifest lists, by their well-formed names (successors/<i>.npy) only."""
    entries = manifest.get("successors", []) if isinstance(manifest.get("successors"), list) else []
    return [e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
            and re.fullmatch(rf"{SUCCESSORS_DIR}/\d+\.npy", e["file"])]


def successor_sizes(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{domain: {"vocab", "k", "bytes"}} of each table a (verified) manifest lists."""
    return {s["domain"]: {k: s[k] for k in SUCCESSOR_FIELDS} for s in manifest.get("successors", [])}
