"""Ray set-up shared by the pipeline and the jobs: connecting, what a task asks for, and the paths a job may use.

`connect(address)` joins the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else starts a
local Ray on every core of this machine. Local clusters run without token auth (`RAY_AUTH_MODE=disabled`
unless set): with auth on, `ray.init()` writes a token file and a later `ray job submit` to a `ray start --head`
cluster fails with "Missing authentication token".

Under `ray job submit`, the driver runs on the head node in the job's working directory: with `--working-dir .`
that is Ray's unpacked copy of the submitter's folder (`<ray temp>/session_*/runtime_resources/
working_dir_files/_ray_pkg_<hash>/`, without `.git`, `.venv` and what `.gitignore` lists), deleted with the
session. Ray 2.60 marks a submitted driver with $RAY_JOB_CONFIG_JSON_ENV_VAR (its runtime env and job id; set by
the job supervisor only) and does not pass on the submitter's own folder ($OLDPWD there is the folder the *head*
was started in), so a relative path cannot be resolved against where the user typed the command.
`check_job_paths` therefore refuses, before any work, what would silently go wrong there: a relative input that
does not exist in the copy, a relative output (lost with the copy), and a tracking store that is a file in the
copy; each error names the flag and an absolute form (`"$PWD/..."`, expanded by the submitter's shell).
Without --working-dir the driver runs in the folder the head was started in (also checked on Ray 2.60): a missing
relative input is refused the same way, and outputs, which persist there, are let through.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from knnssd.errors import KnnSsdError

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted driver only


def connect(address: str | None = None) -> None:
    """Connect to the cluster at `address` or $RAY_ADDRESS, else start a local Ray (no dashboard)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)


def task_resources(threads: int = 1) -> dict[str, float]:
    """What one model-holding task asks for: a GPU where the cluster has GPUs, else as many CPUs as it runs
    torch threads (so tasks on one node never oversubscribe its cores, and every trial is timed with the thread
    count the runtime uses), refused up front when no node has that many."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": 1}
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if threads > largest:
        raise KnnSsdError(f"each task decodes with {threads} torch threads, but no Ray node has more than "
                          f"{largest:g} CPUs",
                          fix=f"pass --threads {int(largest) or 1} (or KNNSSD_THREADS), or add larger nodes")
    return {"num_cpus": threads}


def search_resources(threads: int, search_threads: int,
                     log: Callable[[str], None]) -> tuple[dict[str, float], int]:
    """What one search task asks for, and the torch threads it replays on. On a single CPU node,
    `search_threads` CPUs and threads (a trial's replay is mostly one Python thread, so N cores search N studies
    at once), while its trials are priced with the step-cost table of `threads`, timed before the searches on
    that node. On several CPU nodes a node's first search would time that node's table holding fewer CPUs than
    it times with, beside other searches, so there each search keeps `threads` CPUs and threads (said in the
    log). A GPU where the cluster has them, with `threads`."""
    import ray

    full, lane = task_resources(threads), task_resources(search_threads)
    cpu_nodes = [node for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) > 0]
    if "num_cpus" not in lane or lane == full:
        return full, threads
    if len(cpu_nodes) > 1:
        log(f"search: {len(cpu_nodes)} CPU nodes: each search keeps {full} (a node's first search times its "
            "step-cost table, which must not run beside other searches); --search-threads applies on one node")
        return full, threads
    return lane, search_threads


@dataclass(frozen=True)
class JobFolder:
    """The working directory of a `ray job submit` driver: `copy` when it is Ray's unpacked, throwaway copy of
    --working-dir, else the folder the Ray head was started in (no --working-dir)."""

    path: Path
    copy: bool

    def __str__(self) -> str:
        return (f"Ray's throwaway copy of --working-dir ({self.path})" if self.copy
                else f"the folder the Ray head was started in ({self.path})")


def submitted_job() -> JobFolder | None:
    """This process's working directory as a `ray job submit` driver; None outside a job."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    cwd = Path.cwd()
    return JobFolder(cwd, copy=bool(runtime_env.get("working_dir")) or cwd.name.startswith("_ray_pkg_"))


def _absolute_hint(flag: str, value: str) -> str:
    return f'pass an absolute path, e.g. {flag} "$PWD/{value}" (your shell expands $PWD where you run `ray job submit`)'


def file_store_path(uri: str) -> str | None:
    """The file path of a local store URI (`sqlite:///PATH`, `file:PATH`, or a bare path); None for a server
    or a database URL (http://, postgresql://, ...)."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):]
    if uri.startswith("file:"):
        return uri[len("file:"):].removeprefix("//")
    return None if "://" in uri else uri


def check_job_paths(inputs: dict[str, str | None], outputs: dict[str, str | None],
                    tracking: tuple[str, str | None] | None) -> None:
    """Inside a `ray job submit` driver (`submitted_job`), refuse what would be read from or written to the job's
    throwaway working directory; outside one, do nothing.

    inputs: flag -> path read by the job (None: not given); a relative one must exist in the job's folder.
    outputs: flag -> path or store URI written by the job (None: not given); a relative one is refused.
    tracking: (flag, URI or None) of the MLflow store the job publishes to (None: it publishes nothing); the
    URI falls back to $MLFLOW_TRACKING_URI; no URI at all (the default store in the working folder) or a
    relative file store is refused, with the flag for an MLflow server.
    Outputs and the tracking store are checked only in Ray's copy of --working-dir, which is deleted with the
    job; without --working-dir the job runs in the folder the head was started in, where they persist.
    """
    where = submitted_job()
    if where is None:
        return
    for flag, value in inputs.items():
        if value and not Path(value).expanduser().is_absolute() and not Path(value).exists():
            raise KnnSsdError(f"{flag} {value} does not exist in this Ray job's working directory, {where}: "
                              "a relative path is read there, not where you ran `ray job submit`",
                              fix=_absolute_hint(flag, value))
    if not where.copy:  # no --working-dir: what is written lands in the head's folder, and stays there
        return
    for flag, value in outputs.items():
        path = file_store_path(value) if value else None
        if path and not Path(path).expanduser().is_absolute():
            example = value[: len(value) - len(path)] + f"$PWD/{path}"  # the store URI's path made absolute
            raise KnnSsdError(f"{flag} {value} is relative: inside a Ray job it would be written to {where}, "
                              "which is deleted with the job, so its results and the state a rerun resumes "
                              "from would be lost",
                              fix=f'pass an absolute path, e.g. {flag} "{example}"')
    if tracking is None:
        return
    flag, uri = tracking
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    fix = (f"start an MLflow server (`.venv/bin/mlflow server ... --host 127.0.0.1 --port 5000`) and pass "
           f"{flag} http://HOST:5000 with a host the head node reaches")
    if not uri:
        raise KnnSsdError(f"no {flag} and no $MLFLOW_TRACKING_URI: inside a Ray job the default MLflow store is a "
                          f"file in {where}, so the published bundle would be lost with the job", fix=fix)
    path = file_store_path(uri)
    if path is not None and not Path(path).expanduser().is_absolute():
        raise KnnSsdError(f"{flag} {uri} is a relative file store: inside a Ray job it would be written to "
                          f"{where}, so the published bundle would be lost with the job", fix=fix)
