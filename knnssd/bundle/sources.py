"""Where bundles come from: a folder on disk, or a version in the MLflow registry.

This module is the core's one seam to `registry/` (the MLflow side). Dependencies point one way,
jobs -> pipeline -> registry -> knnssd: the registry publishes and fetches bundles in the format that
`knnssd.bundle` defines, so the core cannot import the registry at module level. Yet `load_bundle("name@v3")`
and `knnssd bundles ...` are the core's user-facing entries and must accept registry references. So every
registry access of the core goes through the two functions here, which import `registry.mlflow_store` lazily,
only when a registry is actually used: a user who loads bundle folders needs no MLflow at all.
(`tests/test_boundaries.py` asserts that no other core module imports `registry`.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from knnssd.bundle import is_folder_reference
from knnssd.errors import KnnSsdError
from knnssd.bundle.signing import SignatureError


def open_registry(tracking_uri: str | None = None) -> Any:
    """A `registry.mlflow_store.BundleRegistry` on `tracking_uri` (default $MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db), or a clear error when the MLflow extra is not installed."""
    try:
        from registry.mlflow_store import BundleRegistry
    except ImportError as exc:
        raise KnnSsdError(f"the bundle registry needs the mlflow package ({exc})",
                          fix='pip install "knnssd[registry]", or pass a bundle folder') from None
    return BundleRegistry(tracking_uri)


def fetch_bundle(ref: str, tracking_uri: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 keys: Sequence[Path] = ()) -> Path:
    """A local folder holding the bundle `ref`: a folder path (with a separator, or starting with "." or "~") as
    is, else a registry reference downloaded (once, verified: the signature against the trusted `keys` first,
    then the registry's digest) into the cache."""
    path = Path(ref).expanduser()
    if is_folder_reference(ref):
        if not path.is_dir():
            raise KnnSsdError(f"bundle folder {ref!r} does not exist",
                              fix="pass an existing bundle folder or a registry reference such as name@v1")
        return path  # read_bundle says what is wrong with a folder that is not a bundle
    try:
        return open_registry(tracking_uri).fetch(ref, cache_dir=cache_dir, keys=keys)
    except KnnSsdError as exc:
        if not path.is_dir() or isinstance(exc, SignatureError):
            raise
        raise KnnSsdError(f"{exc.problem} ({ref!r} is a registry reference, though a folder of that name exists "
                          "here)", fix=f"to load the folder, write it as a path: ./{ref}") from None
