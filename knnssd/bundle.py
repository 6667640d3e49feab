"""The routing bundle: a folder that ties anchors, domains and draft policies to one model.

    manifest.json    schema version, model id and hash, domains (anchors, policy, metrics per domain),
                     routing settings, creation time, package version, sha256 of every other file
    anchors.npy      (n_anchors, dim) little-endian float32, L2-normalised rows (plain .npy, no pickles)
    anchors.json     {"dim": D, "labels": [domain index of each anchor]}
    policies.json    {domain: draft policy}, plus "__fallback__" for prompts far from every anchor
    stores/<i>.npy   optional, schema 3: domain i's store, a flat little-endian int32 array of token ids, each
                     array followed by -1 (`knnssd.drafters.suffix_tree.SEPARATOR`); the manifest's "stores"
                     lists {domain, file, arrays, tokens, bytes} for each (the file is named by the domain's
                     index, not its name, which may hold any character)
    bundle.sig       optional: the publisher's signature over every other file (`knnssd.signing`)

A draft policy is a JSON object (see knnssd.policy): {"kind": "layer_skip", "skip_set": {"attn": [...],
"mlp": [...]}, "threshold": 0.8, "max_draft_tokens": 12, ...}, {"kind": "prompt_lookup", ...},
{"kind": "hybrid", ...}, {"kind": "suffix_tree", ..., "use_store": true} or {"kind": "none"} (plain decoding). The manifest may also hold reference policies
that calibration searched for comparison but the router never uses ("mix": one policy searched on all
domains' prompts together, the Self-SD(Mix) baseline of evaluation).

A store is the model's own greedy outputs on a domain's calibration prompts (`pipeline.stores`), which a
suffix-tree policy with use_store drafts from. The mix reference and the fallback policy draft from the union of
every domain's store, which is derived at load (`union_store`), never written twice. Stores are bounded: at most
MAX_STORE_TOKENS entries in all, checked from the manifest before any store file is hashed or read, and again on
the arrays read. Schema 2 bundles (no stores) are still read.

Reading first checks the signature against the trusted keys, if any are configured (`knnssd.signing`: an
unsigned bundle, or one signed by another key, is then refused before any of its files is parsed), then the
schema version, the stores' declared sizes and every checksum, and trusts nothing it reads: the anchors are read with `numpy.load(allow_pickle=False)` and checked for dtype, shape, finiteness and
unit norm; stores for dtype, shape and ids in [-1, 2**31) (the runtime checks them against the model's
vocabulary); labels are checked to be domain indices; every policy is checked when the runtime builds its drafter
(at load, before any prompt). The FAISS
index (an exact inner-product index, so "distance" is 1 - cosine) is built from the anchors at load time: no
FAISS file is ever parsed. The checksums catch corruption; the registry's digest (the manifest's sha256 recorded
on the registered version, checked by `registry.mlflow_store.BundleRegistry.fetch`) catches a bundle rewritten in
the artifact store; only the signature says who made the bundle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from knnssd.errors import KnnSsdError
from knnssd.signing import Authenticity, trusted_keys, verify_signature

SCHEMA_VERSION = 3  # 1 stored a FAISS index file; 2 stores plain float32 anchors; 3 adds per-domain stores
READABLE_SCHEMAS = (2, 3)  # 2: as 3 without stores
MANIFEST = "manifest.json"
VECTORS_FILE = "anchors.npy"
ANCHORS_FILE = "anchors.json"
POLICIES_FILE = "policies.json"
BUNDLE_FILES = (VECTORS_FILE, ANCHORS_FILE, POLICIES_FILE)
FALLBACK_KEY = "__fallback__"
STORES_DIR = "stores"
STORE_SEPARATOR = -1  # knnssd.drafters.suffix_tree.SEPARATOR (not imported: this module needs no torch)
MAX_STORE_TOKENS = 4_000_000  # entries (token ids and separators) of all stores of a bundle: 16 MB of int32
NPY_HEADER_MAX = 4096  # bytes a .npy file may hold beyond its data


class BundleError(KnnSsdError):
    """A bundle that cannot be used: missing, tampered, truncated, or of another schema."""


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle holds, before it is written.

    anchors: (n_anchors, dim) float32 embeddings (normalised on write); anchor_domains: (n_anchors,)
    index into `domains`; policies: one per domain; metrics: per-domain calibration figures;
    reference_policies: {name: {"policy": ..., "metrics": ...}} searched for comparison, never routed to;
    stores: {domain: (n,) int32 token ids, each array followed by STORE_SEPARATOR} (`join_store` makes one),
    for any of the domains (the mix reference and the fallback draft from their union).
    """

    model_id: str
    model_hash: str
    domains: tuple[str, ...]
    anchors: np.ndarray
    anchor_domains: tuple[int, ...]
    policies: dict[str, dict[str, Any]]
    fallback_policy: dict[str, Any]
    fallback_distance: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    prompt_format: dict[str, Any] = field(default_factory=lambda: {"chat": True})
    calibration: dict[str, Any] = field(default_factory=dict)
    reference_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    stores: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.anchors.ndim != 2 or self.anchors.shape[0] != len(self.anchor_domains):
            raise BundleError(f"anchors {self.anchors.shape} do not match {len(self.anchor_domains)} labels")
        if set(self.policies) != set(self.domains):
            raise BundleError(f"policies for {sorted(self.policies)} but domains {list(self.domains)}")
        if any(not 0 <= label < len(self.domains) for label in self.anchor_domains):
            raise BundleError("an anchor label points outside the domain list")
        if not self.anchor_domains:
            raise BundleError("a bundle needs at least one anchor", fix="calibrate with at least one prompt per domain")
        if set(self.stores) - set(self.domains):
            raise BundleError(f"stores for {sorted(set(self.stores) - set(self.domains))}, which are not domains",
                              fix="give stores only for the bundle's domains (the union is derived at load)")
        for domain, store in self.stores.items():
            check_store(store, f"the store of domain {domain!r}", BundleError)
        total = sum(int(store.shape[0]) for store in self.stores.values())
        if total > MAX_STORE_TOKENS:
            raise BundleError(f"the stores hold {total} entries, more than a bundle may ({MAX_STORE_TOKENS})",
                              fix="build smaller stores (--store-tokens, fewer prompts)")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle read from `folder`; `index` is the FAISS inner-product index of its unit-norm anchors,
    built at load time; `authenticity`: what its signature check found (`knnssd.signing`)."""

    folder: Path
    manifest: dict[str, Any]
    index: Any
    anchor_domains: tuple[int, ...]
    policies: dict[str, dict[str, Any]]
    authenticity: Authenticity = Authenticity()
    stores: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d["name"] for d in self.manifest["domains"])

    @property
    def model_hash(self) -> str:
        return self.manifest["model_hash"]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def fallback_distance(self) -> float:
        return float(self.manifest["routing"]["fallback_distance"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 and contiguous (what FAISS expects)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("knnssd")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "unknown"


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


def store_entry(domain: str, index: int, store: np.ndarray, folder: Path) -> dict[str, Any]:
    """The manifest's row for domain `index`'s store, written to folder/stores/<index>.npy now."""
    name = f"{STORES_DIR}/{index}.npy"
    (folder / STORES_DIR).mkdir(exist_ok=True)
    np.save(folder / name, store.astype("<i4"), allow_pickle=False)
    arrays = int(np.count_nonzero(store == STORE_SEPARATOR))
    return {"domain": domain, "file": name, "arrays": arrays, "tokens": int(store.shape[0]) - arrays,
            "bytes": (folder / name).stat().st_size}


def write_bundle(spec: BundleSpec, folder: str | os.PathLike[str]) -> Path:
    """Write `spec` as a bundle at `folder` (which must not exist), atomically: a crash leaves nothing there."""
    folder = Path(folder)
    if folder.exists():
        raise BundleError(f"{folder} already exists", fix="write each bundle to a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        anchors = normalise(spec.anchors)
        np.save(tmp / VECTORS_FILE, anchors.astype("<f4"), allow_pickle=False)
        (tmp / ANCHORS_FILE).write_text(json.dumps({"dim": int(anchors.shape[1]),
                                                    "labels": [int(x) for x in spec.anchor_domains]}))
        (tmp / POLICIES_FILE).write_text(json.dumps({**spec.policies, FALLBACK_KEY: spec.fallback_policy},
                                                    indent=2, sort_keys=True))
        stores = [store_entry(name, i, spec.stores[name], tmp) for i, name in enumerate(spec.domains)
                  if name in spec.stores]
        counts = np.bincount(np.asarray(spec.anchor_domains, dtype=np.int64), minlength=len(spec.domains))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model_id": spec.model_id,
            "model_hash": spec.model_hash,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "package_version": package_version(),
            "embedding": {"kind": "final_hidden_mean_pooled", "dim": int(anchors.shape[1]), "metric": "cosine"},
            "prompt_format": spec.prompt_format,
            "routing": {"fallback_distance": float(spec.fallback_distance), "distance": "1 - cosine similarity"},
            "domains": [{"name": name, "anchors": int(counts[i]), "policy": spec.policies[name],
                         "metrics": spec.metrics.get(name, {})} for i, name in enumerate(spec.domains)],
            "fallback_policy": spec.fallback_policy,
            "reference_policies": spec.reference_policies,
            "calibration": spec.calibration,
            "stores": stores,
            "files": {name: sha256_file(tmp / name) for name in (*BUNDLE_FILES, *(s["file"] for s in stores))},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_folder_reference(ref: str) -> bool:
    """Whether `ref` names a bundle folder rather than a registry reference such as name@v3: a folder is written
    as a path, with a separator or starting with "." or "~" (`./name@v3`, `out/bundle`, `/abs/bundle`,
    `~/bundle`); anything else is a registry reference, even where a folder of that name exists in the working
    directory (which would otherwise replace the registry's version, and skip its digest check)."""
    separators = tuple(sep for sep in (os.sep, os.altsep, "/") if sep)
    return ref.startswith((".", "~")) or any(sep in ref for sep in separators)


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


def verify_files(folder: Path, manifest: dict[str, Any], extra: Sequence[str] | None = None) -> None:
    """Check that every file the bundle needs (BUNDLE_FILES and the `extra` store files; None: the store files
    the manifest lists, by their well-formed names only) exists with the sha256 the manifest records."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"the manifest of {folder} has no table of checksums", fix="rebuild the bundle")
    if extra is None:
        entries = manifest.get("stores", []) if isinstance(manifest.get("stores"), list) else []
        extra = [e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
                 and re.fullmatch(rf"{STORES_DIR}/\d+\.npy", e["file"])]
    for name in (*BUNDLE_FILES, *extra):
        if name not in files:
            raise BundleError(f"the manifest of {folder} lists no checksum for {name}", fix="rebuild the bundle")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing", fix="download or publish the bundle again")
        if sha256_file(path) != files[name]:
            raise BundleError(f"bundle file {path} does not match its checksum: tampered or truncated",
                              fix="download or publish the bundle again; never edit a bundle in place")


def manifest_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 of the bundle's manifest.json bytes. The manifest holds the checksum of every other file, so this
    one digest, recorded where the artifact store cannot change it (the registry version), authenticates the
    whole bundle."""
    return sha256_file(Path(folder) / MANIFEST)


def _bad(folder: Path, what: str) -> BundleError:
    return BundleError(f"bundle {folder} is inconsistent: {what}", fix="rebuild or re-publish the bundle")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})", fix="rebuild or re-publish the bundle") from None


def read_anchors(folder: Path, dim: int, count: int) -> np.ndarray:
    """The (count, dim) float32 anchors, read without pickles and checked before use."""
    try:
        anchors = np.load(folder / VECTORS_FILE, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _bad(folder, f"{VECTORS_FILE} is not a plain .npy array ({exc})") from None
    if not isinstance(anchors, np.ndarray):  # an .npz archive loads as a lazy NpzFile
        getattr(anchors, "close", lambda: None)()
        raise _bad(folder, f"{VECTORS_FILE} is a {type(anchors).__name__} (an .npz archive?), not a plain .npy array")
    if anchors.dtype != np.dtype("<f4") or anchors.shape != (count, dim):
        raise _bad(folder, f"{VECTORS_FILE} holds {anchors.dtype} {anchors.shape}, expected float32 ({count}, {dim})")
    norms = np.linalg.norm(anchors, axis=1) if count else np.ones(0)
    if not np.all(np.isfinite(anchors)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise _bad(folder, f"{VECTORS_FILE} holds non-finite or non-unit anchors")
    return np.ascontiguousarray(anchors, dtype=np.float32)


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


def read_store(folder: Path, entry: dict[str, Any]) -> np.ndarray:
    """One domain's (n,) int32 store, read without pickles and checked against its manifest row."""
    name = entry["file"]
    try:
        store = np.load(folder / name, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _bad(folder, f"{name} is not a plain .npy array ({exc})") from None
    if not isinstance(store, np.ndarray):
        getattr(store, "close", lambda: None)()
        raise _bad(folder, f"{name} is a {type(store).__name__} (an .npz archive?), not a plain .npy array")
    if store.dtype != np.dtype("<i4") or store.ndim != 1:
        raise _bad(folder, f"{name} holds {store.dtype} {store.shape}, expected a 1-D int32 array")
    store = np.ascontiguousarray(store, dtype=np.int32)
    check_store(store, name, BundleError)
    arrays = int(np.count_nonzero(store == STORE_SEPARATOR))
    if (arrays, store.shape[0] - arrays) != (entry["arrays"], entry["tokens"]):
        raise _bad(folder, f"{name} holds {arrays} arrays of {store.shape[0] - arrays} tokens, but the manifest "
                           f"says {entry['arrays']} of {entry['tokens']}")
    return store


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
    verify_files(folder, manifest, [entry["file"] for entry in entries])
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
    index = faiss.IndexFlatIP(dim)  # exact inner product over unit vectors: cosine similarity
    index.add(anchors)
    return Bundle(folder=folder, manifest=manifest, index=index, anchor_domains=tuple(raw_labels),
                  policies=policies, authenticity=authenticity, stores=stores)


def manifest_rows(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: {"anchors", "policy", "metrics", "store"}}: the routed domains in order, then each reference
    policy as "(name)" (searched for comparison, never routed to, 0 anchors). "store": {"arrays", "tokens",
    "bytes"} of the domain's store (a reference's: the union of all), None without one. What tables of a
    bundle list."""
    stores = {s["domain"]: {k: s[k] for k in ("arrays", "tokens", "bytes")} for s in manifest.get("stores", [])}
    union = {k: sum(s[k] for s in stores.values()) for k in ("arrays", "tokens", "bytes")} if stores else None
    rows = {d["name"]: {"anchors": d["anchors"], "policy": d["policy"], "metrics": d["metrics"],
                        "store": stores.get(d["name"])} for d in manifest["domains"]}
    rows.update({f"({name})": {"anchors": 0, "policy": ref.get("policy", {}), "metrics": ref.get("metrics", {}),
                               "store": union} for name, ref in manifest.get("reference_policies", {}).items()})
    return rows
