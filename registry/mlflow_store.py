"""Versioned routing bundles in MLflow's model registry.

One MLflow run per calibration holds the parameters, per-domain metrics (``speedup/<domain>``, ...), the model
hash as a tag, a per-domain table and plot, and the bundle folder as the artifact ``bundle``; the folder is
registered as a new version of the registered model named by the bundle name. References:

    name, name@latest   the newest version        name@v3      version 3
    name@production     the version an alias points to

Works against a tracking server (``MLFLOW_TRACKING_URI=http://...``) or, by default, ``sqlite:///mlflow.db``.
The client is created lazily, so a `BundleRegistry` pickles into Ray workers.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from knnssd.cachedir import cache_root
from knnssd.bundle.signing import SignatureError, sign_bundle, verify_signature
from knnssd.bundle.reports import DOMAIN_METRICS, write_bundle_reports
from registry.pages import (MAX_PARAM_CHARS, SHARED_VIEW_TAG, policy_params, runs_table_path, shared_view,
                            summary_markdown, validation_metrics)
from knnssd.bundle import (BundleError, is_folder_reference, manifest_digest, read_bundle, read_manifest,
                           verify_files)

REF_PATTERN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<selector>[A-Za-z0-9._-]+))?$")
RUN_ID_PATTERN = re.compile(r"[0-9a-fA-F]{8,64}")  # MLflow run ids: 32 hex digits; a path component as is
MANIFEST_TAG = "manifest_sha256"  # on each registered version: the digest that authenticates its bundle
DEFAULT_EXPERIMENT = "knnssd-calibration"
# MLflow 3 opens an experiment on its GenAI "Overview" (traces) page unless the experiment says it holds model
# development runs: then the runs table comes first, where bundles are compared.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "KNN-SSD calibration runs: one run per published bundle version "
                                          "(named NAME@vN), evaluations nested under it."}
HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BundleRef:
    """A parsed reference: `version` set for name@vN, `alias` for name@alias, neither for the newest."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "BundleRef":
        match = REF_PATTERN.match(ref.strip()) if isinstance(ref, str) else None
        if not match:
            raise BundleError(f"malformed bundle reference {ref!r}",
                              fix="write NAME, NAME@latest, NAME@vN (e.g. smollm2-135m@v3) or NAME@ALIAS")
        selector = match.group("selector")
        if selector is None or selector == "latest":
            return cls(match.group("name"))
        if re.fullmatch(r"v\d+", selector):
            return cls(match.group("name"), version=int(selector[1:]))
        return cls(match.group("name"), alias=selector)


def check_bundle_name(name: str) -> str:
    """A name to publish under: a reference without '@' (name@v3 names a version, not a bundle)."""
    parsed = BundleRef.parse(name)
    if parsed.name != name.strip():
        raise BundleError(f"bundle name {name!r} names a version or alias, not a bundle",
                          fix=f"publish under the bare name, e.g. --bundle-name {parsed.name}; "
                              "the registry numbers the versions itself")
    return parsed.name


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    run_id: str
    experiment_id: str


class BundleRegistry:
    """Publish, list, resolve and fetch bundles in one MLflow tracking store."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = absolute_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._check_reachable()
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def _check_reachable(self) -> None:
        """Fail within HEALTH_TIMEOUT_S, with a clear message, when a tracking server does not answer."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise BundleError(
                f"the MLflow tracking server at {self.tracking_uri} did not answer within {HEALTH_TIMEOUT_S:.0f} s "
                f"({getattr(exc, 'reason', exc)})",
                fix="start it (mlflow server ...), or set MLFLOW_TRACKING_URI / --tracking-uri to one that runs",
            ) from None

    # -- publishing -------------------------------------------------------------------------------------------
    def publish(self, folder: str | os.PathLike[str], name: str, params: dict[str, Any] | None = None,
                experiment: str = DEFAULT_EXPERIMENT, signing_key: str | os.PathLike[str] | None = None) -> Published:
        """Log `folder` (a verified bundle) as a run and register it as the next version of `name`. With
        `signing_key` (a private key from `knnssd keys generate`), what is uploaded is a copy of the folder signed
        with it (`knnssd.bundle.signing`); the folder itself is left as it is."""
        check_bundle_name(name)
        folder = Path(folder)
        read_bundle(folder, keys=())  # the publisher's own folder: checked, not authenticated
        if signing_key is None:
            return self._publish(folder, name, params, experiment, signed=False)
        with tempfile.TemporaryDirectory() as tmp:
            signed = Path(tmp) / "bundle"
            shutil.copytree(folder, signed)
            sign_bundle(signed, signing_key)
            return self._publish(signed, name, params, experiment, signed=True)

    def _publish(self, folder: Path, name: str, params: dict[str, Any] | None, experiment: str,
                 signed: bool) -> Published:
        from mlflow.entities import Metric, Param

        bundle = read_bundle(folder, keys=())
        client = self.client
        experiment_id = self._experiment_id(experiment)
        run = client.create_run(experiment_id, tags={"model_hash": bundle.model_hash, "bundle_name": name,
                                                      "model_id": bundle.model_id, "mlflow.runName": name,
                                                      MANIFEST_TAG: manifest_digest(folder)})
        run_id = run.info.run_id
        try:
            flat = {"model_id": bundle.model_id, "domains": ",".join(bundle.domains), **(params or {}),
                    **policy_params(bundle.manifest)}
            metrics = []
            for domain in bundle.manifest["domains"]:
                for key in DOMAIN_METRICS:
                    if key in domain["metrics"]:
                        metrics.append(Metric(f"{key}/{domain['name']}", float(domain["metrics"][key]), 0, 0))
            for ref_name, reference in bundle.manifest.get("reference_policies", {}).items():
                for key in DOMAIN_METRICS:
                    if key in reference.get("metrics", {}):
                        metrics.append(Metric(f"{key}/{ref_name}", float(reference["metrics"][key]), 0, 0))
            metrics += [Metric(key, value, 0, 0) for key, value in validation_metrics(bundle.manifest).items()]
            param_list = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat.items()]
            for start in range(0, max(len(param_list), len(metrics)), 90):  # log_batch: at most 100 params
                client.log_batch(run_id, params=param_list[start:start + 90], metrics=metrics[start:start + 90])
            client.log_artifacts(run_id, str(folder), artifact_path="bundle")
            with tempfile.TemporaryDirectory() as tmp:
                for path in write_bundle_reports(bundle.manifest, Path(tmp)):
                    client.log_artifact(run_id, str(path), artifact_path="reports")
            self._ensure_registered_model(name)
            version = client.create_model_version(name, source=f"runs:/{run_id}/bundle", run_id=run_id,
                                                  tags={"model_hash": bundle.model_hash, "signed": str(signed).lower(),
                                                        MANIFEST_TAG: manifest_digest(folder)})
            ref = f"{name}@v{version.version}"
            description = summary_markdown(bundle.manifest, ref)
            client.update_model_version(name, version.version, description=description)
            for key, value in (("mlflow.runName", ref), ("bundle_version", str(version.version)),
                               ("mlflow.note.content", description)):
                client.set_tag(run_id, key, value)
            previous = client.get_experiment(experiment_id).tags.get(SHARED_VIEW_TAG)
            client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG, shared_view(previous, bundle.manifest))
            client.set_terminated(run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        return Published(name=name, version=int(version.version), run_id=run_id, experiment_id=experiment_id)

    def ui_link(self, experiment_id: str) -> str:
        """Where to compare bundles in the MLflow UI: the experiment's runs table in the bundle view (needs a
        server: `mlflow ui --backend-store-uri URI` for a sqlite store)."""
        base = self.tracking_uri.rstrip("/") if self.tracking_uri.startswith(("http://", "https://")) \
            else "http://127.0.0.1:5000"
        return base + runs_table_path(experiment_id)

    def log_evaluation(self, ref: str, params: dict[str, Any], metrics: dict[str, float], folder: Path,
                       experiment: str = DEFAULT_EXPERIMENT) -> str:
        """Log an evaluation of bundle `ref` as a run nested under the bundle's own run (same experiment,
        `mlflow.parentRunId`, and tags naming the bundle): params, metrics, and every file of `folder` as
        artifacts under "evaluation". Returns the run id. A bundle folder (no registry) gets a top-level run."""
        from mlflow.entities import Metric, Param

        client = self.client
        tags = {"kind": "evaluation", "bundle_ref": ref, "mlflow.runName": f"evaluate {ref}"}
        experiment_id = self._experiment_id(experiment)
        if not is_folder_reference(ref):
            name, version = self.resolve(ref)
            bundle_run = client.get_model_version(name, str(version)).run_id
            experiment_id = client.get_run(bundle_run).info.experiment_id
            tags.update({"mlflow.parentRunId": bundle_run, "bundle_run_id": bundle_run, "bundle_name": name,
                         "bundle_version": str(version)})
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        try:
            clean = [Metric(key, float(value), 0, 0) for key, value in metrics.items() if value == value]  # no NaN
            for start in range(0, len(clean), 900):  # log_batch takes at most 1000 metrics
                client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()] if not start
                                 else [], metrics=clean[start:start + 900])
            client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
            client.set_terminated(run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        return run_id

    def _experiment_id(self, experiment: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                return self.client.create_experiment(experiment, tags=EXPERIMENT_TAGS)
            except MlflowException:  # created by a concurrent publisher
                found = self.client.get_experiment_by_name(experiment)
        kind = "mlflow.experimentKind"
        if found.tags.get(kind) != EXPERIMENT_TAGS[kind]:  # made by an older knnssd, or by hand
            self.client.set_experiment_tag(found.experiment_id, kind, EXPERIMENT_TAGS[kind])
        return found.experiment_id

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="KNN-SSD routing bundle")
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str, version: int | None = None) -> int:
        """Remove `alias` from the registered bundle `name`; returns the version it pointed to. Refused, with
        nothing removed, when `name` has no such alias, or when `version` is given and the alias points elsewhere."""
        aliases = {a: row["version"] for row in self.versions(name) for a in row["aliases"]}
        known = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        if alias not in aliases:
            raise BundleError(f"bundle {name!r} has no alias {alias!r} to delete",
                              fix=f"name one of its aliases: {known}")
        if version is not None and aliases[alias] != version:
            raise BundleError(f"alias {alias!r} of bundle {name!r} points to v{aliases[alias]}, not v{version}",
                              fix=f"delete it by the bare bundle name: knnssd bundles alias {name} {alias} --delete")
        self.client.delete_registered_model_alias(name, alias)
        return aliases[alias]

    # -- reading ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(model.name for model in self.client.search_registered_models())

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of `name`, oldest first: version, run id, creation time, aliases, model hash."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException:
            known = ", ".join(self.names()) or "none"
            raise BundleError(f"no bundle named {name!r} in {self.tracking_uri}",
                              fix=f"use one of the registered bundles: {known}") from None
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        rows = [{"version": int(v.version), "run_id": v.run_id, "created": v.creation_timestamp,
                 "aliases": sorted(aliases.get(str(v.version), [])), "model_hash": (v.tags or {}).get("model_hash")}
                for v in self.client.search_model_versions(f"name='{name}'")]
        return sorted(rows, key=lambda row: row["version"])

    def resolve(self, ref: str) -> tuple[str, int]:
        """(name, version number) that `ref` points to, checked against the registry."""
        parsed = BundleRef.parse(ref)
        rows = self.versions(parsed.name)
        listing = ", ".join(f"v{r['version']}" + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
                            for r in rows) or "none"
        if parsed.alias is not None:
            match = [r["version"] for r in rows if parsed.alias in r["aliases"]]
            if not match:
                raise BundleError(f"bundle {parsed.name!r} has no alias {parsed.alias!r}",
                                  fix=f"use one of its versions: {listing}")
            return parsed.name, match[0]
        if parsed.version is not None:
            if parsed.version not in {r["version"] for r in rows}:
                raise BundleError(f"bundle {parsed.name!r} has no version {parsed.version}",
                                  fix=f"use one of its versions: {listing}")
            return parsed.name, parsed.version
        if not rows:
            raise BundleError(f"bundle {parsed.name!r} has no versions yet", fix="publish one first")
        return parsed.name, rows[-1]["version"]

    def _download_version(self, name: str, version: int, destination: Path) -> None:
        """Download a registered version's files into `destination`, through this registry's own client
        (a models:/ URI would resolve against the process-wide registry URI instead)."""
        source = self.client.get_model_version(name, str(version)).source
        parts = _split_runs_uri(source)
        if parts is not None:
            self.client.download_artifacts(parts[0], parts[1], str(destination))
        else:
            import mlflow.artifacts

            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination),
                                                tracking_uri=self.tracking_uri)

    def store_key(self) -> str:
        """A short digest naming this store in the cache."""
        return hashlib.sha256(self.tracking_uri.encode()).hexdigest()[:12]

    def cache_folder(self, name: str, version: int, run_id: str,
                     cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """Where version `version` of `name` is cached. The run id (a random UUID) is part of the path, so two
        stores that reuse a name, a version number, a relative path or a port never share a cache entry."""
        if not RUN_ID_PATTERN.fullmatch(str(run_id)):
            raise BundleError(f"the registry gives bundle {name}@v{version} the run id {run_id!r}, which is not a "
                              "run id", fix="check the tracking server; run ids are hexadecimal")
        return cache_root(cache_dir) / "bundles" / self.store_key() / name / f"v{version}-{run_id}"

    def fetch(self, ref: str, cache_dir: str | os.PathLike[str] | None = None, keys: Sequence[Path] = ()) -> Path:
        """A verified local copy of the bundle `ref`. The reference is always resolved against the registry (one
        metadata call); the files are downloaded once per version and served from the cache after that.

        Verified every time, cached or not: with trusted `keys`, first the signature (`knnssd.bundle.signing`: nothing
        of the bundle is read before it holds; this is what a writer of the tracking store cannot forge); then
        the manifest's sha256 must equal the digest the registry recorded on the version at publish time (the
        artifact store alone cannot change that tag), and every file must match the manifest's checksums. A cache entry that fails is downloaded again; a download that fails is
        refused: the bundle was changed in the artifact store after it was published. A download lands under a
        temporary name and is renamed only once verified."""
        name, version = self.resolve(ref)
        record = self.client.get_model_version(name, str(version))
        expected = (record.tags or {}).get(MANIFEST_TAG)
        if not expected:
            raise BundleError(f"bundle {name}@v{version} has no recorded manifest digest ({MANIFEST_TAG}): it was "
                              "published by an older knnssd, or its tags were removed, so it cannot be verified",
                              fix="publish the bundle again with this knnssd (jobs/calibrate.py, or "
                                  "BundleRegistry.publish on its folder)")
        target = self.cache_folder(name, version, record.run_id, cache_dir)
        if target.is_dir():
            if _signature_holds(target, keys) and _verified(target, expected):
                return target
            shutil.rmtree(target, ignore_errors=True)  # corrupt or tampered cache entry: fetch it again
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            self._download_version(name, version, tmp)
            folder = tmp if (tmp / "manifest.json").is_file() else tmp / "bundle"
            verify_signature(folder, keys)
            if not _verified(folder, expected):
                raise BundleError(
                    f"bundle {name}@v{version} in the artifact store does not match what was published: its "
                    f"manifest's sha256 differs from the digest recorded on the registry version, or a file "
                    f"differs from the manifest's checksum (tampered with, or damaged)",
                    fix="do not use it; publish the bundle again from a trusted calibration folder")
            try:
                os.rename(folder, target)
            except OSError:
                if not (_signature_holds(target, keys) and _verified(target, expected)):
                    raise  # not a concurrent fetch that won with the same verified bundle: a real failure
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def _signature_holds(folder: Path, keys: Sequence[Path]) -> bool:
    try:
        verify_signature(folder, keys)
    except SignatureError:
        return False
    return True


def _verified(folder: Path, expected_manifest_digest: str) -> bool:
    """Whether `folder` holds the published bundle: manifest digest as recorded, files as the manifest says."""
    if not (folder / "manifest.json").is_file() or manifest_digest(folder) != expected_manifest_digest:
        return False
    try:
        verify_files(folder, read_manifest(folder))
    except BundleError:
        return False
    return True


def absolute_uri(uri: str) -> str:
    """`sqlite:///relative.db` made absolute: MLflow caches stores by URI text, so a relative path would make two
    stores in different folders one store, and so would our bundle cache."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def _split_runs_uri(uri: str) -> tuple[str, str] | None:
    """("run id", "artifact path") of a runs:/<id>/<path> URI, else None."""
    match = re.fullmatch(r"runs:/([^/]+)/(.+)", uri)
    return (match.group(1), match.group(2)) if match else None
