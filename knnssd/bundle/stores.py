"""A bundle's per-domain stores (schema 3): joining, writing, checking and reading them.

    stores/<i>.npy   domain i's store, a flat little-endian int32 array of token ids, each array followed by -1
                     (`knnssd.engine.drafters.suffix_tree.SEPARATOR`); the manifest's "stores" lists
                     {domain, file, arrays, tokens, bytes} for each (the file is named by the domain's index, not
                     its name, which may hold any character)

A store is the model's own greedy outputs on a domain's calibration prompts (`pipeline.stores`), which a
suffix-tree policy with use_store drafts from. The mix reference and the fallback policy draft from the union of
every domain's store, which is derived at load (`union_store`), never written twice. Stores are bounded: at most
MAX_STORE_TOKENS entries in all, checked from the manifest before any store file is hashed or read
(`store_entries`), and again on the arrays read (`read_store`: dtype, shape and ids in [-1, 2**31); the runtime
checks them against the model's vocabulary). Schema 2 bundles have no stores. The rest of the format, and the
order in which a bundle is verified, is `knnssd.bundle`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from knnssd.errors import BundleError, KnnSsdError

STORES_DIR = "stores"
STORE_SEPARATOR = -1  # knnssd.engine.drafters.suffix_tree.SEPARATOR (not imported: this module needs no torch)
MAX_STORE_TOKENS = 4_000_000  # entries (token ids and separators) of all stores of a bundle: 16 MB of int32
NPY_HEADER_MAX = 4096  # bytes a .npy file may hold beyond its data
SIZE_FIELDS = ("arrays", "tokens", "bytes")  # a manifest store row's sizes


def join_store(arrays: Sequence[Sequence[int]]) -> np.ndarray:
    """(n,) int32: the token arrays, each followed by STORE_SEPARATOR (n = tokens + arrays)."""
    flat = [token for array in arrays for token in (*array, STORE_SEPARATOR)]
    return np.asarray(flat, dtype=np.int32)


def split_store(store: np.ndarray) -> list[tuple[int, ...]]:
    """The token arrays of a joined (n,) store: the inverse of `join_store`."""
    values = store.tolist()
    arrays, start = [], 0
    for end, value in enumerate(values):
        if value == STORE_SEPARATOR:
            arrays.append(tuple(values[start:end]))
            start = end + 1
    return arrays


def union_store(stores: dict[str, np.ndarray], domains: Sequence[str]) -> np.ndarray:
    """Every domain's store joined, in domain order: what the mix reference and the fallback draft from."""
    parts = [stores[d] for d in domains if d in stores]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)


def check_store(store: Any, what: str, error: type[KnnSsdError] = KnnSsdError) -> None:
    """A store must be a 1-D int32 array of ids >= STORE_SEPARATOR that ends with a separator (or is empty)."""
    if not isinstance(store, np.ndarray) or store.dtype != np.int32 or store.ndim != 1:
        described = f"{store.dtype} {store.shape}" if isinstance(store, np.ndarray) else type(store).__name__
        raise error(f"{what} is {described}, not a 1-D int32 array", fix="build it with knnssd.bundle.join_store")
    if store.size and (int(store.min()) < STORE_SEPARATOR or int(store[-1]) != STORE_SEPARATOR):
        raise error(f"{what} holds ids below {STORE_SEPARATOR} or does not end with a separator",
                    fix="build it with knnssd.bundle.join_store")


def check_spec_stores(stores: dict[str, np.ndarray], domains: Sequence[str]) -> None:
    """The stores of a bundle about to be written: {domain: (n,) int32} for some of `domains`, each well formed,
    at most MAX_STORE_TOKENS entries in all."""
    if set(stores) - set(domains):
        raise BundleError(f"stores for {sorted(set(stores) - set(domains))}, which are not domains",
                          fix="give stores only for the bundle's domains (the union is derived at load)")
    for domain, store in stores.items():
        check_store(store, f"the store of domain {domain!r}", BundleError)
    total = sum(int(store.shape[0]) for store in stores.values())
    if total > MAX_STORE_TOKENS:
        raise BundleError(f"the stores hold {total} entries, more than a bundle may ({MAX_STORE_TOKENS})",
                          fix="build smaller stores (--store-tokens, fewer prompts)")


def store_entry(domain: str, index: int, store: np.ndarray, folder: Path) -> dict[str, Any]:
    """The manifest's row for domain `index`'s store, written to folder/stores/<index>.npy now."""
    name = f"{STORES_DIR}/{index}.npy"
    (folder / STORES_DIR).mkdir(exist_ok=True)
    np.save(folder / name, store.astype("<i4"), allow_pickle=False)
    arrays = int(np.count_nonzero(store == STORE_SEPARATOR))
    return {"domain": domain, "file": name, "arrays": arrays, "tokens": int(store.shape[0]) - arrays,
            "bytes": (folder / name).stat().st_size}


def store_files(manifest: dict[str, Any]) -> list[str]:
    """The store files a manifest lists, by their well-formed names (stores/<i>.npy) only, unchecked otherwise."""
    entries = manifest.get("stores", []) if isinstance(manifest.get("stores"), list) else []
    return [e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
            and re.fullmatch(rf"{STORES_DIR}/\d+\.npy", e["file"])]


def store_sizes(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{domain: {"arrays", "tokens", "bytes"}} of each store a (verified) manifest lists."""
    return {s["domain"]: {k: s[k] for k in SIZE_FIELDS} for s in manifest.get("stores", [])}


