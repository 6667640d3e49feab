"""One torch thread count wherever the engine decodes: calibration trials, evaluation, the CLI, the runtime.

Speedups and verify costs depend on the thread count, so a policy calibrated single-threaded (as Ray's 1-CPU
tasks would run it: Ray sets OMP_NUM_THREADS=1) and deployed on all cores is chosen under other costs. Every
model load sets the count here; Ray tasks ask for as many CPUs as they use threads.

Default: $KNNSSD_THREADS, else every core this process may run on.
"""

from __future__ import annotations

import os

import torch

from knnssd.errors import KnnSsdError


def default_threads() -> int:
    """$KNNSSD_THREADS, else the cores this process may run on."""
    env = os.environ.get("KNNSSD_THREADS")
    if env:
        return resolve_threads(int(env) if env.strip().isdigit() else env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_threads(threads: object = None) -> int:
    """`threads` checked (an integer >= 1), or the default when None."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise KnnSsdError(f"the thread count must be an integer >= 1, got {threads!r}",
                          fix="pass --threads N (or KNNSSD_THREADS=N) with N >= 1, e.g. the number of cores")
    return threads


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count for this process; returns the count in force."""
    count = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
