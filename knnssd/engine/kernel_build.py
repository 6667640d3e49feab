"""Building the engine's kernels (knnssd/engine/csrc/rows_kernels.cpp) once per machine kind, never waiting forever.

The kernel is built at first use with torch's `cpp_extension.load` into the knnssd cache's
kernels/rows_kernels-KEY (KEY from the source, the compiler flags, the CPU's flags and torch's version), about a
minute with a C++ compiler and ninja. torch serialises builds on a lock file in that folder and waits for it with
no timeout; a process killed mid-build (OOM, SIGKILL) leaves the lock behind, so `stale_lock_breaker` removes a
lock older than STALE_LOCK_S while a load waits. Any failure to build means: `compiled_kernel()` is None, the
reason is kept in `compile_error()`, and `knnssd.engine.kernels` uses library calls instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

LOG = logging.getLogger("knnssd")
STALE_LOCK_S = 600.0  # a build lock untouched this long is a dead build's (a build takes about a minute): removed
LOCK_POLL_S = 1.0  # how often the watchdog looks at the build lock
SOURCE = Path(__file__).with_name("csrc") / "rows_kernels.cpp"
_COMPILED: dict[str, Any] = {}  # the built extension, or the reason it is not there ("error")
# -falign-loops=64: every loop starts a 64-byte fetch block. The 1-row product's inner loop is 23 bytes; where a
# change elsewhere in the file moved it across a 64-byte boundary, SmolLM2's 1-row products took 1.21-1.23 times as
# long (twice, the memory fast), with the same instructions (BENCHMARKS 44).
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-falign-loops=64")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def kernel_build_dir() -> Path:
    """Where this machine kind's build of the kernel lives: the knnssd cache's kernels/rows_kernels-KEY, KEY from the
    source, the compiler flags, the CPU flags and torch's version (a change to any of them builds anew)."""
    from knnssd.cachedir import cache_root

    key = hashlib.sha256((SOURCE.read_text() + " ".join(COMPILE_FLAGS) + _cpu_flags() + torch.__version__)
                         .encode()).hexdigest()[:12]
    return cache_root() / "kernels" / f"rows_kernels-{key}"


def break_if_stale(lock: Path, stale_after: float) -> bool:
    """Remove `lock` if its last change is `stale_after` seconds or more ago; whether it did."""
    try:
        age = time.time() - lock.stat().st_mtime
        if age < stale_after:
            return False
        lock.unlink()
    except FileNotFoundError:  # released meanwhile
        return False
    LOG.warning("knnssd: removed the kernel build lock %s, untouched for %.0f s: a build that died (killed, out of "
                "memory) left it", lock, age)
    return True


@contextmanager
def stale_lock_breaker(lock: Path, stale_after: float | None = None,
                       poll: float = LOCK_POLL_S) -> Iterator[threading.Event]:
    """Within the block, `lock` is removed once it is `stale_after` seconds old: at once if it already is, then
    by a watchdog thread every `poll` seconds. Yields an event that is set if the watchdog removed it.

    torch's extension build serialises on a lock file in the build folder and waits for it with no timeout
    (`torch.utils.file_baton.FileBaton.wait`): a process killed mid-build would leave every later load waiting
    forever. The lock of a live build is a few seconds to minutes old (a build takes about a minute), so one older
    than the bound is a dead build's: removing it ends the wait. Never hangs; at worst the load fails and the
    library methods take over."""
    stale_after = STALE_LOCK_S if stale_after is None else stale_after
    stop, broken = threading.Event(), threading.Event()
    break_if_stale(lock, stale_after)  # before the block: the build then takes the lock itself

    def watch() -> None:
        while not stop.wait(poll):
            if break_if_stale(lock, stale_after):
                broken.set()

    watchdog = threading.Thread(target=watch, name="knnssd-build-lock", daemon=True)
    watchdog.start()
    try:
        yield broken
    finally:
        stop.set()
        watchdog.join()


def _load(build: Path) -> Any:
    """torch's build-and-import of the kernel in `build`, never waiting forever on a dead build's lock. A load that
    waited for a build that then died finds nothing to import and fails (the library methods take over); the
    next load finds no lock and builds."""
    from torch.utils.cpp_extension import load

    with stale_lock_breaker(build / "lock") as broken:  # torch's build lock file
        try:
            return load(name=f"knnssd_rows_kernels_{build.name.split('-')[-1]}", sources=[str(SOURCE)],
                        extra_cflags=list(COMPILE_FLAGS), extra_ldflags=["-fopenmp"],
                        build_directory=str(build), verbose=False)
        except ImportError:
            if broken.is_set():
                raise RuntimeError("the build this load waited for died; the next load builds the kernel") from None
            raise


def failure_reason(exc: BaseException) -> str:
    """One line for a failed build: the exception's type and the first line of its message (if it has one)."""
    first = next(iter(str(exc).splitlines()), "").strip()
    return f"C++ kernel not built ({type(exc).__name__}" + (f": {first[:120]}" if first else "") + ")"


def compiled_kernel() -> Any:
    """The kernels' extension (`rows_gemm`, `rows_attention`, `lanes`), built once per machine kind into the
    knnssd cache; None (with the reason logged once, as a warning, and kept in `compile_error()`) where it cannot
    be: an x86 CPU without AVX-512 or AVX2 with FMA, no compiler or ninja, KNNSSD_NO_COMPILE, or a build that
    fails. Never waits forever on a dead build's lock (`stale_lock_breaker`)."""
    if "module" in _COMPILED or "error" in _COMPILED:
        return _COMPILED.get("module")
    flags = _cpu_flags()
    if os.environ.get("KNNSSD_NO_COMPILE"):
        _COMPILED["error"] = "C++ kernel skipped: KNNSSD_NO_COMPILE is set"
    elif not vector_isa(flags):
        _COMPILED["error"] = "C++ kernels need AVX-512 or AVX2 with FMA, which this CPU lacks"
    else:
        try:
            build = kernel_build_dir()
            build.mkdir(parents=True, exist_ok=True)
            if not any(build.glob("*.so")):
                LOG.info("knnssd: building the engine's kernels once (about a minute) into %s", build)
            _COMPILED["module"] = _load(build)
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the library methods
            _COMPILED["error"] = failure_reason(exc)
    if "error" in _COMPILED:
        LOG.warning("knnssd: %s; decoding uses library products instead: plain steps and verify passes then compute "
                    "differently (greedy identity up to near-ties) and speed figures change", _COMPILED["error"])
    return _COMPILED.get("module")


def vector_isa(flags: str | None = None) -> str:
    """The vector instruction set the kernels are built for on this CPU: "avx512" (AVX-512F), "avx2" (AVX2 with
    FMA), or "" (neither: no kernels). `flags`: /proc/cpuinfo's flags line (default: this machine's)."""
    words = set((_cpu_flags() if flags is None else flags).split())
    if "avx512f" in words:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= words else ""


def compile_error() -> str:
    return _COMPILED.get("error", "")
