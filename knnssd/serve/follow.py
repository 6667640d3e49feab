"""The bundle being served, and following a registry reference as its alias moves.

`Follower.current` is the `Serving` (runtime plus the version's name) that new requests take; a request keeps
the one it started with to its end, so a swap never touches a generation in flight. `check()` resolves the
reference again (one registry metadata call): if it points at another version, that version is fetched,
verified and loaded in the calling thread (the poller's or the reload route's, never the generating one) on
the model already loaded, warmed up by `Follower.warm` (one tiny untimed generation per drafter; the server runs
it on its generating thread between requests, since drafting changes the shared model while it runs), and only
then swapped in by one reference assignment. A version that fails (a bundle that
does not verify, another model) is refused and logged, and the current one keeps serving; it is not tried
again until the alias moves once more or a reload asks for it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from knnssd.bundle import is_folder_reference
from knnssd.engine.decoding import warm_up
from knnssd.errors import KnnSsdError
from knnssd.bundle.runtime import BundleRuntime, load_bundle
from knnssd.bundle.sources import open_registry

LOG = logging.getLogger("knnssd.serve")


def warm(runtime: BundleRuntime) -> None:
    """One tiny untimed generation with each distinct drafter of `runtime`, so that its first request does not
    pay one-off costs (allocations, first kernel calls). Run it where no other generation runs on the model."""
    ids = torch.arange(1, 9).unsqueeze(0) % runtime.loaded.model.config.vocab_size
    seen: set[int] = set()
    for drafter in runtime.drafters.values():
        if id(drafter) not in seen:
            seen.add(id(drafter))
            warm_up(runtime.loaded.model, ids, drafter)


@dataclass(frozen=True)
class Serving:
    """A loaded bundle and what names it: `name` (the model name clients send, stable across versions) and
    `label` ("name@vN", or the folder's name for a bundle folder)."""

    runtime: BundleRuntime
    name: str
    label: str
    version: int | None


@dataclass(frozen=True)
class Outcome:
    """What one check did: "unchanged", "fixed" (a folder or pinned version: nothing to follow), "swapped",
    "refused" (the new version failed; the old one serves on)."""

    outcome: str
    bundle: str
    message: str = ""


class Follower:
    """Serves `ref` and, for a registry reference, follows it to new versions."""

    def __init__(self, ref: str, tracking_uri: str | None = None, load: Callable[..., BundleRuntime] = load_bundle,
                 **load_options: Any) -> None:
        """Resolve and load `ref` now (errors are the caller's: bad reference, bundle that fails verification).
        `load_options` go to `load_bundle` (device, dtype, threads, fast_kernels, allow_model_mismatch, ...)."""
        self.ref, self.tracking_uri, self._load, self._options = ref, tracking_uri, load, load_options
        self.folder = is_folder_reference(ref)
        self._refused: int | None = None
        self._lock = threading.Lock()  # one check at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # How a new version is warmed up before it is swapped in; the server sets its own (on its generating thread).
        self.warm: Callable[[BundleRuntime], None] = warm
        if self.folder:
            runtime = load(ref, tracking_uri=tracking_uri, **load_options)
            name = Path(ref).expanduser().resolve().name
            self.current = Serving(runtime=runtime, name=name, label=name, version=None)
        else:
            name, version = self._resolve()
            self.current = self._open(name, version, model=None)

    def _resolve(self) -> tuple[str, int]:
        return open_registry(self.tracking_uri).resolve(self.ref)

    def _open(self, name: str, version: int, model: Any) -> Serving:
        options = dict(self._options)
        if model is not None:
            options["model"] = model
        runtime = self._load(f"{name}@v{version}", tracking_uri=self.tracking_uri, **options)
        return Serving(runtime=runtime, name=name, label=f"{name}@v{version}", version=version)

    def check(self, force: bool = False) -> Outcome:
        """Resolve the reference again and swap in a new version if it moved (see the module docstring).
        `force` tries again a version refused before."""
        with self._lock:
            current = self.current
            if self.folder:
                return Outcome("fixed", current.label, "a bundle folder is served as it is")
            name, version = self._resolve()
            if version == current.version:
                return Outcome("unchanged", current.label)
            if version == self._refused and not force:
                return Outcome("refused", current.label, f"{name}@v{version} was refused before")
            try:
                serving = self._open(name, version, model=current.runtime.loaded)
                LOG.info("warming up %s before it serves", serving.label)
                self.warm(serving.runtime)
            except KnnSsdError as exc:
                self._refused = version
                LOG.error("refused bundle %s@v%s, still serving %s: %s", name, version, current.label, exc)
                return Outcome("refused", current.label, f"{name}@v{version}: {exc}")
            self.current, self._refused = serving, None
            LOG.warning("now serving %s (was %s)", serving.label, current.label)
            return Outcome("swapped", serving.label, f"was {current.label}")

    def start(self, every_seconds: float, on_outcome: Callable[[Outcome], None]) -> None:
        """Poll `check()` every `every_seconds` in a daemon thread (nothing for a folder, or with 0 seconds)."""
        if self.folder or every_seconds <= 0 or self._thread is not None:
            return

        def poll() -> None:
            while not self._stop.wait(every_seconds):
                try:
                    on_outcome(self.check())
                except Exception as exc:  # a registry that is down must not stop the server: say so, try again
                    LOG.warning("could not check %s for a new version: %s", self.ref, exc)
                    on_outcome(Outcome("failed", self.current.label, str(exc)))

        self._thread = threading.Thread(target=poll, name="knnssd-follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
