"""What `knnssd serve` (and the Ray Serve deployment) is configured with: one frozen dataclass, one default each."""

from __future__ import annotations

from dataclasses import dataclass

from knnssd.errors import KnnSsdError


@dataclass(frozen=True)
class ServeSettings:
    """How the server admits, times and follows requests.

    max_batch: requests generating at once, their drafts verified together in one pass per step
        (`knnssd.engine.decoding.step`); 1 generates one request at a time.
    max_queue: requests that may wait while `max_batch` generate; one more gets 429 with Retry-After.
    request_timeout: seconds from the request's arrival to the last token (reading, tokenising and waiting
        included); past it the request ends with a 504 error.
    refresh_seconds: how often a registry reference (name@alias, name@latest, name) is resolved again to
        notice a moved alias; 0 turns polling off (POST /admin/reload still works when an admin token is set).
    admin_token: bearer token of POST /admin/reload; None turns that route off.
    max_body_bytes: larger request bodies get 413.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 16
    request_timeout: float = 300.0
    refresh_seconds: float = 30.0
    admin_token: str | None = None
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        checks = (
            (isinstance(self.port, int) and 0 <= self.port <= 65535, f"--port must be 0-65535, got {self.port}",
             "pick a free port, e.g. --port 8000 (0: any free port)"),
            (isinstance(self.max_batch, int) and not isinstance(self.max_batch, bool) and 1 <= self.max_batch <= 64,
             f"--max-batch must be 1-64, got {self.max_batch}",
             "e.g. --max-batch 8 (1: one request at a time; a pass holds at most 256 rows)"),
            (isinstance(self.max_queue, int) and self.max_queue >= 0, f"--max-queue must be >= 0, got "
             f"{self.max_queue}",
             "e.g. --max-queue 16 (0: only the --max-batch requests being generated are admitted)"),
            (self.request_timeout > 0, f"--request-timeout must be > 0 seconds, got {self.request_timeout}",
             "e.g. --request-timeout 300"),
            (self.refresh_seconds >= 0, f"--refresh-seconds must be >= 0, got {self.refresh_seconds}",
             "e.g. --refresh-seconds 30, or 0 to stop polling the registry"),
            (self.admin_token is None or len(self.admin_token) >= 8, "--admin-token must be at least 8 characters",
             "use a long random token, e.g. $(openssl rand -hex 16)"),
            (self.max_body_bytes >= 1024, f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}",
             "e.g. --max-body-bytes 1048576"),
        )
        for ok, problem, fix in checks:
            if not ok:
                raise KnnSsdError(problem, fix=fix)
