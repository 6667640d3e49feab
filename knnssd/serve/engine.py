"""One generation at a time, a bounded queue before it, and every admitted request answered.

The event loop never generates: `Engine.submit` admits a request (or refuses it with 429 and Retry-After when
`max_queue` requests already wait) and returns a `Job`; one worker thread takes jobs in order and runs each
through `BundleRuntime.generate` with a token hook that

- detokenises each step's tokens and hands the text to the job's asyncio queue (`Delta`), which the route
  streams or gathers;
- stops the generation at the next step when a stop string appears, when the client went away
  (`Job.cancel`), or when the request's deadline (`--request-timeout` after the request arrived) has passed.

A job still waiting when it is cancelled (its client left, or its deadline passed while it waited) gives its
slot back at once, not when the worker reaches it: the next client is admitted although the generation ahead
of it is still running. Every job ends with exactly one `Done` or `Failed` event, unless it was cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Union


from knnssd.bundle.runtime import BundleRuntime
from knnssd.errors import KnnSsdError
from knnssd.serve.follow import Follower, Serving, warm
from knnssd.serve.metrics import Metrics
from knnssd.serve.protocol import Answer, ApiError, internal_error
from knnssd.serve.settings import ServeSettings
from knnssd.serve.text import TextStream
from knnssd.serve.work import Work

LOG = logging.getLogger("knnssd.serve")
FINISH_REASONS = {"eos": "stop", "length": "length"}  # the loop's -> OpenAI's; a stop string is "stop" too


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    answer: Answer


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Union[Delta, Done, Failed]


class WarmUp:
    """A new version's warm-up, handed to the worker thread (between two generations) by the follower's thread,
    which waits for it."""

    def __init__(self, runtime: BundleRuntime) -> None:
        self.runtime, self.done, self.error = runtime, threading.Event(), None

    def run(self) -> None:
        try:
            LOG.info("warm-up on the generating thread")
            warm(self.runtime)
        except Exception as exc:  # noqa: BLE001 - handed to the follower, which refuses the version
            self.error = exc
        finally:
            self.done.set()


class Job:
    """One admitted request: its work, its deadline, and the queue its events arrive on (in the event loop).
    Only a streamed job gets `Delta` events; the others get their one `Done` or `Failed`, so that a coroutine
    waiting for it wakes up regularly to check that its client is still there."""

    def __init__(self, work: Work, timeout: float, stream: bool, arrived: float,
                 release: Callable[["Job"], None] | None = None) -> None:
        self.work, self.stream = work, stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.arrived = arrived  # time.monotonic() when the request reached the route
        self.deadline = arrived + timeout
        self.timeout = timeout
        self.state = "waiting"  # -> "running" -> "over", or "waiting" -> "left"; changed under the engine's lock
        self._release = release
        self._cancelled = threading.Event()

    def emit(self, event: Event) -> None:
        """From the worker thread: hand `event` to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()

    def cancel(self) -> None:
        """The client is gone or the request timed out: stop at the next step, send nothing more; a job still
        waiting gives its slot back now."""
        self._cancelled.set()
        if self._release is not None:
            self._release(self)

    @property
    def waiting(self) -> bool:
        return self.state == "waiting"

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def timeout_error(self) -> ApiError:
        return ApiError(504, f"the request did not finish within --request-timeout ({self.timeout:g} s); ask for "
                             "fewer max_tokens, or run the server with a longer --request-timeout",
                        type="timeout_error", code="request_timeout")


class Engine:
    """The queue and the worker thread for one loaded model (see the module docstring)."""

    def __init__(self, follower: Follower, settings: ServeSettings, metrics: Metrics) -> None:
        self.follower, self.settings, self.metrics = follower, settings, metrics
        self._queue: queue.Queue[Job | WarmUp | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + generating
        self._running = 0
        self._current: Job | None = None  # the job generating now
        self._mean_seconds = 1.0  # moving average of a request's time on the model, for Retry-After
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.follower.warm = self.warm_between_requests
        self._thread = threading.Thread(target=self._work, name="knnssd-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker: the job generating now ends at its next step, the ones waiting are dropped."""
        if self._thread is not None:
            while not self._queue.empty():
                waiting = self._queue.get_nowait()
                if isinstance(waiting, Job):
                    waiting.cancel()
                elif isinstance(waiting, WarmUp):
                    waiting.error = KnnSsdError("the server is stopping")
                    waiting.done.set()
            if self._current is not None:
                self._current.cancel()
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def warm_between_requests(self, runtime: BundleRuntime) -> None:
        """Warm `runtime` up on the worker thread, after the requests queued before this call (from the follower's
        thread; waits for it). Raises KnnSsdError when the worker is gone or the warm-up failed."""
        task = WarmUp(runtime)
        self._queue.put(task)
        while not task.done.wait(1.0):
            if self._thread is None or not self._thread.is_alive():
                raise KnnSsdError("the server stopped before the new version was warmed up",
                                  fix="restart the server")
        if task.error is not None:
            LOG.error("warm-up of a new version failed", exc_info=task.error)
            raise KnnSsdError(f"the new version's warm-up failed ({type(task.error).__name__})",
                              fix="see the server's log")

    def submit(self, work: Work, stream: bool, arrived: float) -> Job:
        """Admit `work` (from the event loop) that arrived at `arrived` (time.monotonic()), or raise the 429
        ApiError when the queue is full."""
        with self._lock:
            if self._admitted > self.settings.max_queue:
                retry = max(1, math.ceil(self._mean_seconds * self._admitted))
                raise ApiError(429, f"the server is busy: {self._admitted - 1} requests wait for the model, the "
                                    f"most --max-queue allows ({self.settings.max_queue}); retry in {retry} s",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
            self._admitted += 1
            self._gauges(running=None)
        job = Job(work, self.settings.request_timeout, stream, arrived, release=self._release)
        self._queue.put(job)
        return job

    def _release(self, job: Job) -> None:
        """A cancelled job that still waits leaves the queue's count now (the worker skips it later)."""
        with self._lock:
            if job.state == "waiting":
                job.state = "left"
                self._admitted -= 1
                self._gauges(running=None)

    def _gauges(self, running: bool | None) -> None:
        """Update the queue gauges (under `self._lock`)."""
        if running is not None:
            self._running = int(running)
            self.metrics.running.set(self._running)
        self.metrics.queue_depth.set(max(0, self._admitted - self._running))

    def _work(self) -> None:
        try:
            warm(self.follower.current.runtime)
        except Exception:  # noqa: BLE001 - a failed warm-up is logged; /ready then stays 503
            LOG.exception("warm-up failed; the server stays not ready")
            return
        self.ready.set()
        while (job := self._queue.get()) is not None:
            if isinstance(job, WarmUp):
                job.run()
                continue
            start = time.monotonic()
            with self._lock:
                if job.state != "waiting":
                    continue  # its client left while it waited: its slot is already free
                job.state = "running"
                self._gauges(running=True)
                self._current = job
            final: Event | None = None
            try:
                final = self._run(job)
            except KnnSsdError as exc:
                final = Failed(ApiError(400, str(exc), code="invalid_value"))
            except Exception:  # noqa: BLE001 - a bug must still answer the request; its details go to the log
                final = Failed(internal_error(LOG, "generation failed"))
            finally:
                # The slot is free before the answer leaves: a client that sends its next request as soon as
                # it has this one's answer must find room for it.
                with self._lock:
                    job.state = "over"
                    self._admitted -= 1
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - start)
                    self._gauges(running=False)
                    self._current = None
                if final is not None:
                    job.emit(final)

    def _run(self, job: Job) -> Event | None:
        """Generate `job`, streaming its text; returns its final event (None: its client left)."""
        if job.cancelled:
            return None  # its client left while it waited
        if time.monotonic() > job.deadline:
            return Failed(job.timeout_error())
        serving: Serving = self.follower.current  # this request runs on this version to its end
        stream = TextStream(serving.runtime.loaded.tokenizer, job.work.stops)
        first: list[float] = []

        def on_tokens(tokens: tuple[int, ...]) -> bool:
            if not first:
                first.append(time.monotonic())
            piece = stream.push(tokens)
            if piece and job.stream:
                job.emit(Delta(piece))
            return not (stream.stopped or job.cancelled or time.monotonic() > job.deadline)

        work = job.work
        routed = serving.runtime.generate(work.ids, work.max_tokens, work.sampling, on_tokens=on_tokens)
        end = time.monotonic()
        tail = stream.finish()
        if tail and job.stream:
            job.emit(Delta(tail))
        result = routed.result
        domain = "fallback" if routed.route.fallback else routed.route.domain
        self.metrics.record_generation(domain, routed.route.fallback, result.stats)
        if job.cancelled:
            return None
        if result.finish_reason == "stopped" and not stream.stopped:
            return Failed(job.timeout_error())
        tokens = len(result.token_ids)
        self.metrics.ttft.observe(first[0] - job.arrived)
        if tokens > 1:
            self.metrics.tpot.observe((end - first[0]) / (tokens - 1))
        self.metrics.e2e.observe(end - job.arrived)
        finish = "stop" if stream.stopped else FINISH_REASONS[result.finish_reason]
        self.metrics.success.labels(finish).inc()
        info: dict[str, Any] = {**serving.runtime.describe(routed), "bundle": serving.label}
        return Done(Answer(text=stream.text, finish_reason=finish, prompt_tokens=int(work.ids.shape[1]),
                           completion_tokens=tokens, knnssd=info))
