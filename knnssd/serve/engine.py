"""Many generations at once, a bounded queue before them, and every admitted request answered.

The event loop never generates: `Engine.submit` admits a request (or refuses it with 429 and Retry-After when
`max_batch` requests generate and `max_queue` more wait) and returns a `Job`; one worker thread runs the batch:

- between steps it admits waiting jobs up to `max_batch` running ones: each is prefilled and routed
  (`BundleRuntime.start`), its first token streamed at once;
- each step drafts for every running request (each with its own routed policy) and verifies all their drafts in one
  forward pass (`knnssd.engine.decoding.step`), with each request's draft length from the batch's token budget
  (`knnssd.engine.budget`, from pass costs timed at start-up): a request alone keeps its policy's length, and as
  the batch grows speculation shrinks down to plain batched decoding;
- a token hook per request detokenises each step's tokens and hands the text to the job's asyncio queue (`Delta`),
  and stops that request at the next step when a stop string appears, when the client went away (`Job.cancel`),
  or when the request's deadline (`--request-timeout` after the request arrived) has passed; a finished request
  leaves the batch and its slot is free before its answer is sent.

A job still waiting when it is cancelled (its client left, or its deadline passed while it waited) gives its
slot back at once. Every job ends with exactly one `Done` or `Failed` event, unless it was cancelled. A prefill
runs between two steps, so a long prompt delays the running requests' next token by its prefill (no chunked
prefill).
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


from knnssd.bundle.runtime import BundleRuntime, RoutedGeneration
from knnssd.engine.batch import can_batch
from knnssd.engine.budget import PassCosts, batch_caps, time_pass_costs
from knnssd.engine.decoding import step
from knnssd.engine.kvcache import new_cache
from knnssd.engine.sublayers import model_lock
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


@dataclass(frozen=True, eq=False)
class Running:
    """A job in the batch: the version it runs on, its routed generation, its text stream, and when its first
    token came (filled by its token hook)."""

    job: Job
    serving: Serving
    routed: RoutedGeneration
    stream: TextStream
    first: list[float]
    started: float


class Engine:
    """The queue and the worker thread for one loaded model (see the module docstring)."""

    def __init__(self, follower: Follower, settings: ServeSettings, metrics: Metrics) -> None:
        self.follower, self.settings, self.metrics = follower, settings, metrics
        self._queue: queue.Queue[Job | WarmUp | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + generating
        self._running: list[Running] = []
        self._mean_seconds = 1.0  # moving average of a request's time on the model, for Retry-After
        self.costs: PassCosts | None = None  # timed at start when batching
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.follower.warm = self.warm_between_requests
        self._thread = threading.Thread(target=self._work, name="knnssd-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker: the jobs generating now end at their next step, the ones waiting are dropped."""
        if self._thread is not None:
            while not self._queue.empty():
                waiting = self._queue.get_nowait()
                if isinstance(waiting, Job):
                    waiting.cancel()
                elif isinstance(waiting, WarmUp):
                    waiting.error = KnnSsdError("the server is stopping")
                    waiting.done.set()
            for running in list(self._running):
                running.job.cancel()
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def warm_between_requests(self, runtime: BundleRuntime) -> None:
        """Warm `runtime` up on the worker thread, between two steps (from the follower's thread; waits for it).
        Raises KnnSsdError when the worker is gone or the warm-up failed."""
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

    @property
    def capacity(self) -> int:
        """Requests admitted at most: `max_batch` generating plus `max_queue` waiting."""
        return self.settings.max_batch + self.settings.max_queue

    def submit(self, work: Work, stream: bool, arrived: float) -> Job:
        """Admit `work` (from the event loop) that arrived at `arrived` (time.monotonic()), or raise the 429
        ApiError when the batch and the queue are full."""
        with self._lock:
            if self._admitted >= self.capacity:
                waiting = self._admitted - len(self._running)
                retry = max(1, math.ceil(self._mean_seconds * self._admitted / self.settings.max_batch))
                raise ApiError(429, f"the server is busy: {len(self._running)} requests generate and {waiting} "
                                    f"wait, the most --max-batch ({self.settings.max_batch}) and --max-queue "
                                    f"({self.settings.max_queue}) allow; retry in {retry} s",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
            self._admitted += 1
            self._gauges()
        job = Job(work, self.settings.request_timeout, stream, arrived, release=self._release)
        self._queue.put(job)
        return job

    def _release(self, job: Job) -> None:
        """A cancelled job that still waits leaves the queue's count now (the worker skips it later)."""
        with self._lock:
            if job.state == "waiting":
                job.state = "left"
                self._admitted -= 1
                self._gauges()

    def _gauges(self) -> None:
        """Update the queue gauges (under `self._lock`)."""
        self.metrics.running.set(len(self._running))
        self.metrics.queue_depth.set(max(0, self._admitted - len(self._running)))

    def _work(self) -> None:
        try:
            runtime = self.follower.current.runtime
            warm(runtime)
        except Exception:  # noqa: BLE001 - a failed warm-up is logged; /ready then stays 503
            LOG.exception("warm-up failed; the server stays not ready")
            return
        self._time_costs(runtime.loaded.model)
        self.ready.set()
        while True:
            try:
                if not self._admit():
                    break
                if self._running:
                    self._step()
            except Exception:  # noqa: BLE001 - a bug fails the running requests, not the server
                error = internal_error(LOG, "the batch worker failed")
                for running in list(self._running):
                    self._finish(running, Failed(error))
        for running in list(self._running):
            self._finish(running, None)

    def _time_costs(self, model: Any) -> None:
        """Time the pass costs the token budget reads, where this model's requests can share a pass; else each
        request keeps its policy's draft length (no costs: no budget)."""
        if self.settings.max_batch < 2 or not can_batch(model, [new_cache(model)], 1):
            return
        try:
            with model_lock(model):
                self.costs = time_pass_costs(model)
        except Exception:  # noqa: BLE001 - the server serves without a budget rather than not at all
            LOG.exception("timing pass costs failed; each request keeps its policy's draft length")
            return
        LOG.info("pass costs (in 1-row passes): %s", ", ".join(
            f"{w} rows {c:.2f}" for w, c in self.costs.relative().items()))

    def _admit(self) -> bool:
        """Take waiting jobs (and warm-ups) until the batch is full or none waits; block while nothing runs.
        False when the server stops."""
        while len(self._running) < self.settings.max_batch:
            try:
                item = self._queue.get(block=not self._running)
            except queue.Empty:
                return True
            if item is None:
                return False
            if isinstance(item, WarmUp):
                item.run()
                continue
            self._begin(item)
        return True

    def _begin(self, job: Job) -> None:
        """Prefill and route `job` and put it into the batch, or answer it now (its client left, its deadline
        passed, its prompt is refused)."""
        with self._lock:
            if job.state != "waiting":
                return  # its client left while it waited: its slot is already free
            job.state = "running"
        final: Event | None = None
        if job.cancelled:
            final = None
        elif time.monotonic() > job.deadline:
            final = Failed(job.timeout_error())
        else:
            try:
                self._start(job)
                return
            except KnnSsdError as exc:
                final = Failed(ApiError(400, str(exc), code="invalid_value"))
            except Exception:  # noqa: BLE001 - a bug must still answer the request; its details go to the log
                final = Failed(internal_error(LOG, "generation failed"))
        self._free(job, time.monotonic())
        if final is not None:
            job.emit(final)

    def _start(self, job: Job) -> None:
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

        started = time.monotonic()
        work = job.work
        with model_lock(serving.runtime.loaded.model):
            routed = serving.runtime.start(work.ids, work.max_tokens, work.sampling, on_tokens=on_tokens)
        running = Running(job=job, serving=serving, routed=routed, stream=stream, first=first, started=started)
        with self._lock:
            self._running.append(running)
            self._gauges()
        if routed.generation.done:  # one token asked for, an EOS first, or a stop string in the first token
            self._finish(running, self._final(running))

    def _step(self) -> None:
        """One step of every running request, in one verify pass per model; the finished ones answered."""
        batch = list(self._running)
        by_model: dict[int, list[Running]] = {}
        for running in batch:
            by_model.setdefault(id(running.serving.runtime.loaded.model), []).append(running)
        for group in by_model.values():
            model = group[0].serving.runtime.loaded.model
            generations = [running.routed.generation for running in group]
            before = [generation.tally() for generation in generations]
            try:
                with model_lock(model):
                    step(model, generations, batch_caps(generations, self.costs))
            except Exception:  # noqa: BLE001 - a bug fails the step's requests, not the server
                error = internal_error(LOG, "a batched step failed")
                for running in group:
                    self._finish(running, Failed(error))
                continue
            self.metrics.batch_size.observe(len(group))
            for generation, (drafted, accepted) in zip(generations, before):
                now_drafted, now_accepted = generation.tally()
                self.metrics.step_drafted.observe(now_drafted - drafted)
                self.metrics.step_accepted.observe(now_accepted - accepted)
        for running in batch:
            if running.routed.generation.done and running in self._running:
                self._finish(running, self._final(running))

    def _free(self, job: Job, started: float) -> None:
        with self._lock:
            job.state = "over"
            self._admitted -= 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - started)
            self._gauges()

    def _finish(self, running: Running, final: Event | None) -> None:
        """`running` leaves the batch; its slot is free before its answer leaves: a client that sends its next
        request as soon as it has this one's answer must find room for it."""
        with self._lock:
            if running in self._running:
                self._running.remove(running)
        self._free(running.job, running.started)
        if final is not None:
            running.job.emit(final)

    def _final(self, running: Running) -> Event | None:
        """`_answer`, or a generic 500 where building the answer fails (a bug must still answer the request)."""
        try:
            return self._answer(running)
        except Exception:  # noqa: BLE001
            return Failed(internal_error(LOG, "answering a generation failed"))

    def _answer(self, running: Running) -> Event | None:
        """The final event of a finished generation (None: its client left)."""
        job, serving, stream, first = running.job, running.serving, running.stream, running.first
        routed = serving.runtime.finish(running.routed)
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
        return Done(Answer(text=stream.text, finish_reason=finish, prompt_tokens=int(job.work.ids.shape[1]),
                           completion_tokens=tokens, knnssd=info))
