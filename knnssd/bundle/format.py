"""The routing bundle: a folder that ties anchors, domains and draft policies to one model.

    manifest.json    schema version, model id and hash, domains (anchors, policy, metrics per domain),
                     routing settings, creation time, package version, sha256 of every other file
    anchors.npy      (n_anchors, dim) little-endian float32, L2-normalised rows (plain .npy, no pickles)
    anchors.json     {"dim": D, "labels": [domain index of each anchor]}
    policies.json    {domain: draft policy}, plus "__fallback__" for prompts far from every anchor
    stores/<i>.npy   optional, schema 3: domain i's store of token ids (`knnssd.bundle.stores`)
    successors/<i>.npy  optional, schema 4: domain i's warm successor table (vocab, k) int32
                     (`knnssd.bundle.successors`), what a suffix tree with use_warm starts from
    bundle.sig       optional: the publisher's signature over every other file (`knnssd.bundle.signing`)

A draft policy is a JSON object (see knnssd.engine.policy): {"kind": "layer_skip", "skip_set": {"attn": [...],
"mlp": [...]}, "threshold": 0.8, "max_draft_tokens": 12, ...}, {"kind": "prompt_lookup", ...},
{"kind": "hybrid", ...}, {"kind": "suffix_tree", ..., "use_store": true} or {"kind": "none"} (plain decoding).
The manifest may also hold reference policies that calibration searched for comparison but the router never uses
("mix": one policy searched on all domains' prompts together, the Self-SD(Mix) baseline of evaluation). The
per-domain stores (what they hold, how they are bounded and checked) are `knnssd.bundle.stores`'s, the
per-domain successor tables `knnssd.bundle.successors`'s. Schema 2 bundles (no stores) and schema 3 bundles (no
successor tables) are still read.

Reading (`knnssd.bundle.reading`) first checks the signature against the trusted keys, if any are configured (`knnssd.bundle.signing`: an
unsigned bundle, or one signed by another key, is then refused before any of its files is parsed), then the
schema version, the stores' declared sizes and every checksum, and trusts nothing it reads: the anchors are
read with `numpy.load(allow_pickle=False)` and checked for dtype, shape, finiteness and unit norm; stores as
`knnssd.bundle.stores` says; labels are checked to be domain indices; every policy is checked when the runtime
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
from typing import Any

import numpy as np

from knnssd.bundle.signing import Authenticity
from knnssd.bundle.stores import SIZE_FIELDS, check_spec_stores, store_entry, store_sizes
from knnssd.bundle.successors import check_spec_successors, successor_entry
from knnssd.errors import BundleError

SCHEMA_VERSION = 4  # 1 stored a FAISS index file; 2 plain float32 anchors; 3 per-domain stores; 4 successor tables
READABLE_SCHEMAS = (2, 3, 4)  # 2: as 3 without stores; 3: as 4 without successor tables
MANIFEST = "manifest.json"
VECTORS_FILE = "anchors.npy"
ANCHORS_FILE = "anchors.json"
POLICIES_FILE = "policies.json"
BUNDLE_FILES = (VECTORS_FILE, ANCHORS_FILE, POLICIES_FILE)
FALLBACK_KEY = "__fallback__"


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle holds, before it is written.

    anchors: (n_anchors, dim) float32 embeddings (normalised on write); anchor_domains: (n_anchors,)
    index into `domains`; policies: one per domain; metrics: per-domain calibration figures;
    reference_policies: {name: {"policy": ..., "metrics": ...}} searched for comparison, never routed to;
    stores: {domain: (n,) int32 token ids, each array followed by STORE_SEPARATOR} (`join_store` makes one),
    for any of the domains (the mix reference and the fallback draft from their union); successors: {domain:
    (vocab, k) int32 warm successor table} for any of the domains (`knnssd.bundle.successors`).
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
    successors: dict[str, np.ndarray] = field(default_factory=dict)

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
        check_spec_successors(self.successors, self.domains)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle read from `folder`; `index` is the FAISS inner-product index of its unit-norm anchors,
    built at load time; `authenticity`: what its signature check found (`knnssd.bundle.signing`)."""

    folder: Path
    manifest: dict[str, Any]
    index: Any
    anchor_domains: tuple[int, ...]
    policies: dict[str, dict[str, Any]]
    authenticity: Authenticity = Authenticity()
    stores: dict[str, np.ndarray] = field(default_factory=dict)
    successors: dict[str, np.ndarray] = field(default_factory=dict)

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
        tables = [successor_entry(name, i, spec.successors[name], tmp) for i, name in enumerate(spec.domains)
                  if name in spec.successors]
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
            "successors": tables,
            "files": {name: sha256_file(tmp / name)
                      for name in (*BUNDLE_FILES, *(s["file"] for s in stores), *(t["file"] for t in tables))},
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


def manifest_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 of the bundle's manifest.json bytes. The manifest holds the checksum of every other file, so this
    one digest, recorded where the artifact store cannot change it (the registry version), authenticates the
    whole bundle."""
    return sha256_file(Path(folder) / MANIFEST)


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
