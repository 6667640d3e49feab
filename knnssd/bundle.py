"""The routing bundle: a folder that ties anchors, domains and draft policies to one model.

    manifest.json    schema version, model id and hash, domains (anchors, policy, metrics per domain),
                     routing settings, creation time, package version, sha256 of every other file
    anchors.npy      (n_anchors, dim) little-endian float32, L2-normalised rows (plain .npy, no pickles)
    anchors.json     {"dim": D, "labels": [domain index of each anchor]}
    policies.json    {domain: draft policy}, plus "__fallback__" for prompts far from every anchor
    stores/<i>.npy   optional, schema 3: domain i's store of token ids (`knnssd.bundle_stores`)
    bundle.sig       optional: the publisher's signature over every other file (`knnssd.signing`)

A draft policy is a JSON object (see knnssd.policy): {"kind": "layer_skip", "skip_set": {"attn": [...],
"mlp": [...]}, "threshold": 0.8, "max_draft_tokens": 12, ...}, {"kind": "prompt_lookup", ...},
{"kind": "hybrid", ...}, {"kind": "suffix_tree", ..., "use_store": true} or {"kind": "none"} (plain decoding).
The manifest may also hold reference policies that calibration searched for comparison but the router never uses
("mix": one policy searched on all domains' prompts together, the Self-SD(Mix) baseline of evaluation). The
per-domain stores (what they hold, how they are bounded and checked) are `knnssd.bundle_stores`'s. Schema 2
bundles (no stores) are still read.

Reading first checks the signature against the trusted keys, if any are configured (`knnssd.signing`: an
unsigned bundle, or one signed by another key, is then refused before any of its files is parsed), then the
schema version, the stores' declared sizes and every checksum, and trusts nothing it reads: the anchors are
read with `numpy.load(allow_pickle=False)` and checked for dtype, shape, finiteness and unit norm; stores as
`knnssd.bundle_stores` says; labels are checked to be domain indices; every policy is checked when the runtime
builds its drafter (at load, before any prompt). The FAISS index (an exact inner-product index, so "distance"
is 1 - cosine) is built from the anchors at load time: no FAISS file is ever parsed. The checksums catch
corruption; the registry's digest (the manifest's sha256 recorded on the registered version, checked by
`registry.mlflow_store.BundleRegistry.fetch`) catches a bundle rewritten in the artifact store; only the
signature says who made the bundle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from knnssd.bundle_stores import (  # noqa: F401 (re-exported: the store API was this module's)
    MAX_STORE_TOKENS, NPY_HEADER_MAX, SIZE_FIELDS, STORE_SEPARATOR, STORES_DIR, check_spec_stores, check_store,
    join_store, load_plain_npy, read_store, split_store, store_entries, store_entry, store_files, store_sizes,
    union_store)
from knnssd.errors import BundleError
from knnssd.signing import Authenticity, trusted_keys, verify_signature

SCHEMA_VERSION = 3  # 1 stored a FAISS index file; 2 stores plain float32 anchors; 3 adds per-domain stores
READABLE_SCHEMAS = (2, 3)  # 2: as 3 without stores
MANIFEST = "manifest.json"
VECTORS_FILE = "anchors.npy"
ANCHORS_FILE = "anchors.json"
POLICIES_FILE = "policies.json"
BUNDLE_FILES = (VECTORS_FILE, ANCHORS_FILE, POLICIES_FILE)
FALLBACK_KEY = "__fallback__"
_bad = BundleError.inconsistent  # _bad(folder, what): "bundle {folder} is inconsistent: {what}"


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
        check_spec_stores(self.stores, self.domains)


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
        extra = store_files(manifest)
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
    stores = store_sizes(manifest)
    union = {k: sum(s[k] for s in stores.values()) for k in SIZE_FIELDS} if stores else None
    rows = {d["name"]: {"anchors": d["anchors"], "policy": d["policy"], "metrics": d["metrics"],
                        "store": stores.get(d["name"])} for d in manifest["domains"]}
    rows.update({f"({name})": {"anchors": 0, "policy": ref.get("policy", {}), "metrics": ref.get("metrics", {}),
                               "store": union} for name, ref in manifest.get("reference_policies", {}).items()})
    return rows
