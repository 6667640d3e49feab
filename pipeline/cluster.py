"""Ray set-up shared by the pipeline and the jobs: connecting, and what a task asks for.

`connect(address)` joins the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else starts a
local Ray on every core of this machine. Local clusters run without token auth (`RAY_AUTH_MODE=disabled`
unless set): with auth on, `ray.init()` writes a token file and a later `ray job submit` to a `ray start --head`
cluster fails with "Missing authentication token".
"""

from __future__ import annotations

import os

import ray

from knnssd.errors import KnnSsdError


def connect(address: str | None = None) -> None:
    """Connect to the cluster at `address` or $RAY_ADDRESS, else start a local Ray (no dashboard)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)


def task_resources(threads: int = 1) -> dict[str, float]:
    """What one model-holding task asks for: a GPU where the cluster has GPUs, else as many CPUs as it runs
    torch threads (so tasks on one node never oversubscribe its cores, and every trial is timed with the thread
    count the runtime uses), refused up front when no node has that many."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": 1}
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if threads > largest:
        raise KnnSsdError(f"each task decodes with {threads} torch threads, but no Ray node has more than "
                          f"{largest:g} CPUs",
                          fix=f"pass --threads {int(largest) or 1} (or KNNSSD_THREADS), or add larger nodes")
    return {"num_cpus": threads}
