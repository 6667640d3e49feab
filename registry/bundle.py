"""The routing bundle: a folder that ties anchors, domains and draft policies to one model.

    manifest.json    schema version, model id and hash, domains (anchors, policy, metrics per domain),
                     routing settings, creation time, package version, sha256 of every other file
    anchors.faiss    FAISS IndexFlatIP over the L2-normalised anchors (inner product = cosine similarity)
    anchors.json     {"dim": D, "labels": [domain index of each anchor]}
    policies.json    {domain: draft policy}, plus "__fallback__" for prompts far from every anchor

A draft policy is a JSON object (see knnssd.policy): {"kind": "layer_skip", "skip_set": {"attn": [...],
"mlp": [...]}, "threshold": 0.8, "max_draft_tokens": 12, ...}, {"kind": "prompt_lookup", ...},
{"kind": "hybrid", ...} or {"kind": "none"} (plain decoding). The manifest may also hold reference policies
that calibration searched for comparison but the router never uses ("mix": one policy searched on all
domains' prompts together, the Self-SD(Mix) baseline of evaluation).

Reading verifies the schema version and every checksum before anything else is parsed, and never unpickles:
FAISS reads its own binary format, everything else is JSON.
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

from knnssd.errors import KnnSsdError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "anchors.faiss"
ANCHORS_FILE = "anchors.json"
POLICIES_FILE = "policies.json"
FALLBACK_KEY = "__fallback__"


class BundleError(KnnSsdError):
    """A bundle that cannot be used: missing, tampered, truncated, or of another schema."""


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle holds, before it is written.

    anchors: (n_anchors, dim) float32 embeddings (normalised on write); anchor_domains: (n_anchors,)
    index into `domains`; policies: one per domain; metrics: per-domain calibration figures;
    reference_policies: {name: {"policy": ..., "metrics": ...}} searched for comparison, never routed to.
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

    def __post_init__(self) -> None:
        if self.anchors.ndim != 2 or self.anchors.shape[0] != len(self.anchor_domains):
            raise BundleError(f"anchors {self.anchors.shape} do not match {len(self.anchor_domains)} labels")
        if set(self.policies) != set(self.domains):
            raise BundleError(f"policies for {sorted(self.policies)} but domains {list(self.domains)}")
        if any(not 0 <= label < len(self.domains) for label in self.anchor_domains):
            raise BundleError("an anchor label points outside the domain list")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle read from `folder`; `index` is the FAISS index of normalised anchors."""

    folder: Path
    manifest: dict[str, Any]
    index: Any
    anchor_domains: tuple[int, ...]
    policies: dict[str, dict[str, Any]]

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
    import faiss

    folder = Path(folder)
    if folder.exists():
        raise BundleError(f"{folder} already exists", fix="write each bundle to a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        anchors = normalise(spec.anchors)
        index = faiss.IndexFlatIP(anchors.shape[1])
        index.add(anchors)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / ANCHORS_FILE).write_text(json.dumps({"dim": int(anchors.shape[1]),
                                                    "labels": [int(x) for x in spec.anchor_domains]}))
        (tmp / POLICIES_FILE).write_text(json.dumps({**spec.policies, FALLBACK_KEY: spec.fallback_policy},
                                                    indent=2, sort_keys=True))
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
            "files": {name: sha256_file(tmp / name) for name in (INDEX_FILE, ANCHORS_FILE, POLICIES_FILE)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_folder_reference(ref: str) -> bool:
    """Whether `ref` names a bundle folder (it holds a manifest, or it is a path with a separator) rather than a
    registry reference such as name@v3."""
    return (Path(ref).expanduser() / MANIFEST).is_file() or os.sep in ref


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} holds no {MANIFEST}; it is not a routing bundle",
                          fix="point at a bundle folder or a registry reference such as name@v1")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is damaged ({exc})", fix="download or publish the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise BundleError(f"bundle schema version {version!r} is not supported (this knnssd reads {SCHEMA_VERSION})",
                          fix="rebuild the bundle with this version of knnssd, or upgrade knnssd")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check that every file named in the manifest exists with its recorded sha256, and no other is needed."""
    files = manifest.get("files", {})
    for name in (INDEX_FILE, ANCHORS_FILE, POLICIES_FILE):
        if name not in files:
            raise BundleError(f"the manifest of {folder} lists no checksum for {name}", fix="rebuild the bundle")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing", fix="download or publish the bundle again")
        if sha256_file(path) != files[name]:
            raise BundleError(f"bundle file {path} does not match its checksum: tampered or truncated",
                              fix="download or publish the bundle again; never edit a bundle in place")


def read_bundle(folder: str | os.PathLike[str]) -> Bundle:
    """Read and verify the bundle at `folder` (schema, checksums, consistency); never unpickles."""
    import faiss

    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    anchors = json.loads((folder / ANCHORS_FILE).read_text())
    policies = json.loads((folder / POLICIES_FILE).read_text())
    index = faiss.read_index(str(folder / INDEX_FILE))
    labels = tuple(int(x) for x in anchors["labels"])
    domains = [d["name"] for d in manifest["domains"]]
    if index.ntotal != len(labels) or index.d != anchors["dim"] or FALLBACK_KEY not in policies:
        raise BundleError(f"bundle {folder} is inconsistent (index {index.ntotal}x{index.d}, {len(labels)} labels)",
                          fix="rebuild the bundle")
    if set(policies) - {FALLBACK_KEY} != set(domains):
        raise BundleError(f"bundle {folder} has policies for {sorted(policies)} but domains {domains}",
                          fix="rebuild the bundle")
    return Bundle(folder=folder, manifest=manifest, index=index, anchor_domains=labels, policies=policies)
