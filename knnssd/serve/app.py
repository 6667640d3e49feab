"""The FastAPI app: OpenAI's completions, chat completions and models routes, health, readiness, metrics and
the admin reload, over one `Engine` (`build_app`). `knnssd serve` runs it on uvicorn; jobs/serve.py deploys the
same app on Ray Serve."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from knnssd.serve.engine import Delta, Done, Engine, Failed, Job
from knnssd.serve.follow import Follower, Outcome
from knnssd.serve.metrics import Metrics
from knnssd.serve.protocol import (Answer, ApiError, ChatRequest, Common, CompletionRequest, Envelope, internal_error,
                                   parse_request, sse)
from knnssd.serve.settings import ServeSettings
from knnssd.serve.work import make_work

LOG = logging.getLogger("knnssd.serve")
POLL_SECONDS = 0.25  # how often a waiting non-streamed request checks that its client is still there
GRACE_SECONDS = 1.0  # past its deadline, a request the worker has not ended yet is ended here
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/reload")
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"  # the X-KnnSsd-Server header: which process answered


class ClientGone(Exception):
    """The client of a non-streamed request disconnected while it waited."""


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: a body over `limit` bytes gets 413 (by Content-Length before reading, else while
    reading), and every response names the process that answered (X-KnnSsd-Server)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            error = ApiError(413, f"the request body is larger than this server accepts ({self.limit} bytes)",
                             code="request_too_large")
            response = JSONResponse(error.body(), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge()
            return message

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-knnssd-server", SERVER_ID.encode())]}
            await send(message)

        await self.app(scope, limited, named)


def build_app(follower: Follower, settings: ServeSettings) -> FastAPI:
    """The server's app for the bundle `follower` serves; starting it (its lifespan) starts the generating
    worker (which warms the model up; /ready answers 200 after that) and the registry poller."""
    metrics = Metrics()
    engine = Engine(follower, settings, metrics)
    # Parsing and tokenising a body (up to --max-body-bytes, seconds for 1 MiB) run here, off the event loop, so
    # /health and the other requests' streams are answered meanwhile; one thread: one tokeniser call at a time.
    preparing = ThreadPoolExecutor(1, thread_name_prefix="knnssd-prepare")

    async def off_loop(function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(preparing, function, *args)
    shown = [follower.current.label]

    def note(outcome: Outcome) -> None:
        if outcome.outcome in ("swapped", "refused", "failed"):
            metrics.reloads.labels(outcome.outcome).inc()
        if outcome.bundle != shown[0]:
            metrics.serving(outcome.bundle, previous=shown[0])
            shown[0] = outcome.bundle

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.serving(follower.current.label)
        engine.start()
        follower.start(settings.refresh_seconds, note)
        try:
            yield
        finally:
            follower.stop()
            engine.stop()
            preparing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="knnssd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, limit=settings.max_body_bytes)
    app.state.engine, app.state.follower, app.state.metrics = engine, follower, metrics

    def count(request: Request, status: int | str) -> None:
        path = request.url.path
        metrics.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        count(request, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return await api_error(request, ApiError(413, f"the request body is larger than this server accepts "
                                                      f"({settings.max_body_bytes} bytes)", code="request_too_large"))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        count(request, 499)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception) -> JSONResponse:
        """Any other exception is a fault of the server's: a generic 500 (no exception text), details logged."""
        try:
            raise exc
        except Exception:  # noqa: BLE001 - re-raised here only so that the log gets its traceback
            error = internal_error(LOG, f"{request.method} {request.url.path} failed")
        return await api_error(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return await api_error(request, ApiError(exc.status_code, message, code="not_found"
                                                 if exc.status_code == 404 else None))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine.ready.is_set():
            return JSONResponse({"status": "ready", "bundle": follower.current.label})
        return JSONResponse({"status": "warming up", "bundle": follower.current.label}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        serving = follower.current
        count(request, 200)
        return {"object": "list", "data": [{
            "id": serving.name, "object": "model", "created": int(time.time()), "owned_by": "knnssd",
            "knnssd": {"bundle": serving.label, "model": serving.runtime.bundle.model_id,
                       "domains": list(serving.runtime.bundle.domains),
                       "context_length": serving.runtime.context_length}}]}

    @app.post("/admin/reload")
    async def reload(request: Request) -> dict[str, str]:
        if settings.admin_token is None:
            raise ApiError(404, "POST /admin/reload is off; start the server with --admin-token to turn it on",
                           code="not_found")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.admin_token}".encode()):
            raise ApiError(401, "missing or wrong admin token; send the header 'Authorization: Bearer TOKEN' with "
                                "the server's --admin-token", type="authentication_error", code="invalid_api_key")
        try:
            outcome = await asyncio.to_thread(follower.check, True)
        except Exception:  # noqa: BLE001 - the registry is down or answers nonsense: say so, details logged
            LOG.exception("POST /admin/reload: could not check %s in the registry", follower.ref)
            raise ApiError(502, f"could not check {follower.ref} in the registry; the server's log has the "
                                "details", type="server_error", code="registry_unavailable") from None
        note(outcome)
        count(request, 200)
        return {"outcome": outcome.outcome, "bundle": outcome.bundle, "message": outcome.message}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.monotonic()  # --request-timeout counts from here: reading and tokenising are in it
        return await answer(request, await off_loop(parse_request, await request.body(), CompletionRequest),
                            chat=False, arrived=arrived)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        return await answer(request, await off_loop(parse_request, await request.body(), ChatRequest), chat=True,
                            arrived=arrived)

    async def answer(request: Request, parsed: Common, chat: bool, arrived: float) -> Response:
        serving = follower.current
        if parsed.model not in (serving.name, serving.label, follower.ref):
            raise ApiError(404, f"model {parsed.model!r} is not served here; this server serves {serving.name!r} "
                                "(GET /v1/models lists it)", param="model", code="model_not_found")
        if not engine.ready.is_set():
            raise ApiError(503, "the server is still warming up; retry when GET /ready answers 200",
                           type="server_error", code="not_ready", headers={"Retry-After": "1"})
        work = await off_loop(make_work, parsed, serving.runtime, chat)
        job = engine.submit(work, stream=parsed.stream, arrived=arrived)
        metrics.prompt_tokens.inc(int(work.ids.shape[1]))
        envelope = Envelope.new(serving.name, chat)
        if parsed.stream:
            return StreamingResponse(stream(request, job, envelope, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        done = await gather(job, request)
        count(request, 200)
        return JSONResponse(envelope.full(done))

    async def next_event(job: Job, request: Request | None) -> Delta | Done | Failed:
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            if request is not None and await request.is_disconnected():
                job.cancel()
                raise ClientGone()
            # A waiting job ends at its deadline; a generating one gets a grace for the worker to end it first.
            if time.monotonic() > job.deadline + (0.0 if job.waiting else GRACE_SECONDS):
                job.cancel()
                raise job.timeout_error()

    async def gather(job: Job, request: Request) -> Answer:
        try:
            while True:
                event = await next_event(job, request)
                if isinstance(event, Done):
                    return event.answer
                if isinstance(event, Failed):
                    raise event.error
        finally:
            job.cancel()  # a no-op once answered; stops the generation if this coroutine was cancelled (shutdown)

    async def stream(request: Request, job: Job, envelope: Envelope, include_usage: bool) -> AsyncIterator[bytes]:
        status: int = 499  # unless it ends otherwise, the client went away (the generator is cancelled)
        try:
            if envelope.chat:
                yield sse(envelope.chunk("", first=True))
            while True:
                try:
                    event = await next_event(job, None)
                except ApiError as exc:
                    event = Failed(exc)
                if isinstance(event, Delta):
                    yield sse(envelope.chunk(event.text))
                    continue
                if isinstance(event, Done):
                    yield sse(envelope.chunk(None, event.answer.finish_reason, extra={"knnssd": event.answer.knnssd}))
                    if include_usage:
                        yield sse(envelope.usage_chunk(event.answer))
                    status = 200
                else:
                    yield sse(event.error.body())
                    status = event.error.status
                yield sse("[DONE]")
                return
        finally:
            job.cancel()  # nothing more is read: stop at the next step (a no-op once the job is over)
            count(request, status)

    return app
