"""Reading a bundle folder, in the order it is verified: the signature against the trusted keys first
(`knnssd.bundle.signing`: with a key configured, an unsigned bundle or one signed by another key is refused
before any file is parsed), then the manifest's schema, the stores' and successor tables' declared sizes, every
checksum, and every value read. Nothing is unpickled: arrays are read with `numpy.load(allow_pickle=False)` and checked for dtype,
shape and range. The format itself is `knnssd.bundle.format`'s (files, manifest, writing) and
`knnssd.bundle.stores`'s (the store arrays) and `knnssd.bundle.successors`'s (the successor tables).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from knnssd.bundle.format import (ANCHORS_FILE, BUNDLE_FILES, FALLBACK_KEY, MANIFEST, POLICIES_FILE,
                                  READABLE_SCHEMAS, VECTORS_FILE, Bundle, sha256_file)
from knnssd.bundle.signing import trusted_keys, verify_signature
from knnssd.bundle.stores import (MAX_STORE_TOKENS, NPY_HEADER_MAX, STORE_SEPARATOR, STORES_DIR, check_store,
                                  store_files)
from knnssd.bundle.successors import (MAX_SUCCESSOR_VOCAB, MAX_SUCCESSORS, SUCCESSORS_DIR, check_successors,
                                      successor_files)
from knnssd.errors import BundleError

_bad = BundleError.inconsistent  # _bad(folder, what): "bundle {folder} is inconsistent: {what}"


def load_plain_npy(folder: Path, name: str) -> np.ndarray:
    """folder/name as a plain .npy array, never unpickled: an object array or an .npz archive is refused."""
    try:
        array = np.load(folder / name, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _bad(folder, f"{name} is not a plain .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive loads as a lazy NpzFile
        getattr(array, "close", lambda: None)()
        raise _bad(folder, f"{name} is a {type(array).__name__} (an .npz archive?), not a plain .npy array")
    return array


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} holds no {MANIFEST}; it is not a routing bundle",
                          fix="point at a bundle folder or a registry reference such as name@v1")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is damaged ({exc})", fix="download or publish the bundle again") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if isinstance(version, bool) or version not in READABLE_SCHEMAS:
        raise BundleError(f"bundle schema version {version!r} is not supported (this knnssd reads "
                          f"{', '.join(map(str, READABLE_SCHEMAS))})",
                          fix="rebuild the bundle with this version of knnssd, or upgrade knnssd")
    return manifest


def store_entries(folder: Path, manifest: dict[str, Any], domains: Sequence[str]) -> list[dict[str, Any]]:
    """The manifest's store rows, checked before any store file is hashed or read: one per known domain, its
    own file name, sizes that fit MAX_STORE_TOKENS, and a file on disk no larger than its declared entries."""
    if manifest["schema_version"] < 3:
        return []
    entries = manifest.get("stores", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _bad(folder, "the manifest's stores are not a list of objects")
    total, seen = 0, set()
    for entry in entries:
        domain, arrays, tokens = entry.get("domain"), entry.get("arrays"), entry.get("tokens")
        if domain not in domains or domain in seen:
            raise _bad(folder, f"a store for {domain!r}, which is not a domain or has a store already")
        seen.add(domain)
        if entry.get("file") != f"{STORES_DIR}/{domains.index(domain)}.npy":
            raise _bad(folder, f"the store of {domain!r} names file {entry.get('file')!r}")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in (arrays, tokens)):
            raise _bad(folder, f"the store of {domain!r} declares arrays {arrays!r} and tokens {tokens!r}")
        total += arrays + tokens
        if total > MAX_STORE_TOKENS:
            raise BundleError(f"bundle {folder} declares stores of more than {MAX_STORE_TOKENS} entries in all, "
                              "more than this knnssd reads", fix="rebuild the bundle with smaller stores "
                                                                  "(--store-tokens, fewer prompts)")
        path = folder / entry["file"]
        if path.is_file() and path.stat().st_size > 4 * (arrays + tokens) + NPY_HEADER_MAX:
            raise _bad(folder, f"{entry['file']} is larger than the {arrays + tokens} entries it declares")
    return entries


def successor_entries(folder: Path, manifest: dict[str, Any], domains: Sequence[str]) -> list[dict[str, Any]]:
    """The manifest's successor table rows, checked before any table file is hashed or read: one per known
    domain, its own file name, vocab in 1..MAX_SUCCESSOR_VOCAB and k in 1..MAX_SUCCESSORS, and a file on disk no
    larger than its declared (vocab, k) int32."""
    if manifest["schema_version"] < 4:
        return []
    entries = manifest.get("successors", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _bad(folder, "the manifest's successors are not a list of objects")
    seen = set()
    for entry in entries:
        domain, vocab, k = entry.get("domain"), entry.get("vocab"), entry.get("k")
        if domain not in domains or domain in seen:
            raise _bad(folder, f"a successor table for {domain!r}, which is not a domain or has a table already")
        seen.add(domain)
        if entry.get("file") != f"{SUCCESSORS_DIR}/{domains.index(domain)}.npy":
            raise _bad(folder, f"the successor table of {domain!r} names file {entry.get('file')!r}")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (vocab, k)) or not 1 <= k <= MAX_SUCCESSORS:
            raise _bad(folder, f"the successor table of {domain!r} declares vocab {vocab!r} and k {k!r}")
        if not 1 <= vocab <= MAX_SUCCESSOR_VOCAB:
            raise BundleError(f"bundle {folder} declares a successor table of {vocab} rows for {domain!r}, not "
                              f"1..{MAX_SUCCESSOR_VOCAB} (what this knnssd reads)",
                              fix="rebuild the bundle for a model of a smaller vocabulary, or without tables")
        path = folder / entry["file"]
        if path.is_file() and path.stat().st_size > 4 * vocab * k + NPY_HEADER_MAX:
            raise _bad(folder, f"{entry['file']} is larger than the ({vocab}, {k}) table it declares")
    return entries


def verify_files(folder: Path, manifest: dict[str, Any], extra: Sequence[str] | None = None) -> None:
    """Check that every file the bundle needs (BUNDLE_FILES and the `extra` store and successor files; None: those
    the manifest lists, by their well-formed names only) exists with the sha256 the manifest records."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"the manifest of {folder} has no table of checksums", fix="rebuild the bundle")
    if extra is None:
        extra = [*store_files(manifest), *successor_files(manifest)]
    for name in (*BUNDLE_FILES, *extra):
        if name not in files:
            raise BundleError(f"the manifest of {folder} lists no checksum for {name}", fix="rebuild the bundle")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing", fix="download or publish the bundle again")
        if sha256_file(path) != files[name]:
            raise BundleError(f"bundle file {path} does not match its checksum: tampered or truncated",
                              fix="download or publish the bundle again; never edit a bundle in place")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})", fix="rebuild or re-publish the bundle") from None


def read_anchors(folder: Path, dim: int, count: int) -> np.ndarray:
    """The (count, dim) float32 anchors, read without pickles and checked before use."""
    anchors = load_plain_npy(folder, VECTORS_FILE)
    if anchors.dtype != np.dtype("<f4") or anchors.shape != (count, dim):
        raise _bad(folder, f"{VECTORS_FILE} holds {anchors.dtype} {anchors.shape}, expected float32 ({count}, {dim})")
    norms = np.linalg.norm(anchors, axis=1) if count else np.ones(0)
    if not np.all(np.isfinite(anchors)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise _bad(folder, f"{VECTORS_FILE} holds non-finite or non-unit anchors")
    return np.ascontiguousarray(anchors, dtype=np.float32)


def read_store(folder: Path, entry: dict[str, Any]) -> np.ndarray:
    """One domain's (n,) int32 store, read without pickles and checked against its manifest row."""
    name = entry["file"]
    store = load_plain_npy(folder, name)
    if store.dtype != np.dtype("<i4") or store.ndim != 1:
        raise _bad(folder, f"{name} holds {store.dtype} {store.shape}, expected a 1-D int32 array")
    store = np.ascontiguousarray(store, dtype=np.int32)
    check_store(store, name, BundleError)
    arrays = int(np.count_nonzero(store == STORE_SEPARATOR))
    if (arrays, store.shape[0] - arrays) != (entry["arrays"], entry["tokens"]):
        raise _bad(folder, f"{name} holds {arrays} arrays of {store.shape[0] - arrays} tokens, but the manifest "
                           f"says {entry['arrays']} of {entry['tokens']}")
    return store


def read_successors(folder: Path, entry: dict[str, Any]) -> np.ndarray:
    """One domain's (vocab, k) int32 successor table, read without pickles (after its checksum is verified) and
    checked against its manifest row: dtype, shape, ids in -1..vocab-1."""
    name = entry["file"]
    table = load_plain_npy(folder, name)
    if table.dtype != np.dtype("<i4") or table.shape != (entry["vocab"], entry["k"]):
        raise _bad(folder, f"{name} holds {table.dtype} {table.shape}, expected int32 ({entry['vocab']}, "
                           f"{entry['k']}) as the manifest declares")
    table = np.ascontiguousarray(table, dtype=np.int32)
    check_successors(table, name, BundleError)
    return table


def read_bundle(folder: str | os.PathLike[str], keys: Sequence[str | os.PathLike[str]] | None = None) -> Bundle:
    """Read and verify the bundle at `folder`: the signature against the trusted `keys` first (None: those of
    $KNNSSD_TRUSTED_KEYS; empty: none, unauthenticated), then schema, checksums and every value; never unpickles."""
    import faiss

    folder = Path(folder)
    authenticity = verify_signature(folder, trusted_keys(keys))
    manifest = read_manifest(folder)
    try:
        domains = [d["name"] for d in manifest["domains"]]
    except (KeyError, TypeError) as exc:
        raise _bad(folder, f"the manifest's domains are malformed ({exc!r})") from None
    entries = store_entries(folder, manifest, domains)
    tables = successor_entries(folder, manifest, domains)
    verify_files(folder, manifest, [entry["file"] for entry in (*entries, *tables)])
    anchors_meta, policies = _read_json(folder / ANCHORS_FILE), _read_json(folder / POLICIES_FILE)
    try:
        dim = anchors_meta["dim"]
        raw_labels = anchors_meta["labels"]
        float(manifest["routing"]["fallback_distance"])
        manifest["model_hash"], manifest["model_id"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(folder, f"a required field is missing or malformed ({exc!r})") from None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or not isinstance(raw_labels, list):
        raise _bad(folder, f"{ANCHORS_FILE} needs an integer dim >= 1 and a list of labels")
    if any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < len(domains) for x in raw_labels):
        raise _bad(folder, f"an anchor label is not a domain index in 0..{len(domains) - 1}")
    if not raw_labels:
        raise _bad(folder, f"{ANCHORS_FILE} lists no anchors, so no prompt could be routed")
    if not isinstance(policies, dict) or FALLBACK_KEY not in policies or set(policies) - {FALLBACK_KEY} != set(domains):
        raise _bad(folder, f"policies for {sorted(policies) if isinstance(policies, dict) else policies!r} "
                           f"but domains {domains}")
    anchors = read_anchors(folder, dim, len(raw_labels))
    stores = {entry["domain"]: read_store(folder, entry) for entry in entries}
    successors = {entry["domain"]: read_successors(folder, entry) for entry in tables}
    index = faiss.IndexFlatIP(dim)  # exact inner product over unit vectors: cosine similarity
    index.add(anchors)
    return Bundle(folder=folder, manifest=manifest, index=index, anchor_domains=tuple(raw_labels),
                  policies=policies, authenticity=authenticity, stores=stores,
                  successors=successors)
