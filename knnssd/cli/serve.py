"""`knnssd serve --bundle REF`: the OpenAI-compatible server on uvicorn.

    knnssd serve --bundle smollm2-135m@production --port 8000 --refresh-seconds 30 --admin-token "$TOKEN"

The bundle is resolved, verified and loaded before the port opens, so a bad reference, a bundle that fails
verification or a port in use is one `error: ... (fix: ...)` line and exit 2, not a server that never gets
ready. FastAPI and uvicorn are imported only here (the `serve` extra), so `knnssd generate` works without them.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Any

from knnssd.cli.bundles import TRACKING_HELP
from knnssd.cli.entry import add_engine_flags, add_trusted_key_flag
from knnssd.errors import KnnSsdError
from knnssd.serve.settings import ServeSettings

LOG = logging.getLogger("knnssd.serve")
ADMIN_TOKEN_ENV = "KNNSSD_ADMIN_TOKEN"
BUNDLE_HELP = ("NAME@vN, NAME@ALIAS, NAME@latest, NAME, or a bundle folder as a path (./folder); an alias, "
               "@latest or a bare name is followed (see --refresh-seconds).")


def add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of how requests are admitted, timed and followed: the same on `knnssd serve` and jobs/serve.py."""
    parser.add_argument("--max-batch", type=int, default=ServeSettings.max_batch,
                        help="requests generating at once, every running request's drafts verified in one forward "
                             "pass per step; the token budget shrinks drafts as the batch grows (1: one request at "
                             "a time).")
    parser.add_argument("--max-queue", type=int, default=ServeSettings.max_queue,
                        help="requests that may wait while --max-batch generate; more get 429 with Retry-After (on Ray "
                             "Serve the proxy holds max(1, this) more per replica and sheds the rest with 429).")
    parser.add_argument("--request-timeout", type=float, default=ServeSettings.request_timeout,
                        help="seconds from the request's arrival to the last token (reading, tokenising and waiting "
                             "included); past it the request ends with a 504 error.")
    parser.add_argument("--refresh-seconds", type=float, default=ServeSettings.refresh_seconds,
                        help="how often to look for a moved alias in the registry (0: never).")
    parser.add_argument("--admin-token", default=None,
                        help="turns POST /admin/reload on, for clients sending 'Authorization: Bearer TOKEN' "
                             f"(default: ${ADMIN_TOKEN_ENV}, else off).")
    parser.add_argument("--max-body-bytes", type=int, default=ServeSettings.max_body_bytes,
                        help="larger request bodies get 413.")
    add_trusted_key_flag(parser)


def settings_from(args: argparse.Namespace, host: str, port: int) -> ServeSettings:
    """ServeSettings from the flags of `add_serving_flags`."""
    return ServeSettings(host=host, port=port, max_batch=args.max_batch, max_queue=args.max_queue,
                         request_timeout=args.request_timeout,
                         refresh_seconds=args.refresh_seconds, max_body_bytes=args.max_body_bytes,
                         admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None)


def add_command(commands: Any) -> None:
    """The `serve` sub-command, added to the `knnssd` parser's sub-parsers."""
    serve = commands.add_parser("serve", help="serve a routing bundle over an OpenAI-compatible HTTP API.")
    serve.add_argument("--bundle", required=True, help=BUNDLE_HELP)
    serve.add_argument("--tracking-uri", help=TRACKING_HELP)
    serve.add_argument("--allow-model-mismatch", action="store_true",
                       help="serve a bundle although the model's hash differs from the bundle's model.")
    serve.add_argument("--host", default=ServeSettings.host, help="address to listen on (0.0.0.0: every interface).")
    serve.add_argument("--port", type=int, default=ServeSettings.port, help="port to listen on (0: any free one).")
    add_serving_flags(serve)
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                       help="uvicorn's and knnssd's log level.")
    add_engine_flags(serve, "the server")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
    serve.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA).")
    serve.set_defaults(handler=run_serve)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a clear error (port in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog while the model loads (uvicorn's default backlog)
    except OSError as exc:
        raise KnnSsdError(f"cannot listen on {host}:{port} ({exc})",
                          fix="pick a free --port (or --port 0 for any), or another --host") from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from knnssd.serve.app import build_app
    except ImportError as exc:
        raise KnnSsdError(f"knnssd serve needs FastAPI, uvicorn and prometheus-client ({exc})",
                          fix='pip install "knnssd[serve]"') from None
    from knnssd.serve.follow import Follower

    settings = settings_from(args, args.host, args.port)
    sock = listen(settings.host, settings.port)
    logging.getLogger("knnssd").setLevel(args.log_level.upper())
    follower = Follower(args.bundle, args.tracking_uri, device=args.device, dtype=args.dtype, threads=args.threads,
                        fast_kernels=not args.no_fast_kernels, allow_model_mismatch=args.allow_model_mismatch,
                        trusted_keys=tuple(args.trusted_key) if args.trusted_key else None)
    host, port = sock.getsockname()[:2]
    print(f"serving {follower.current.label} as model {follower.current.name!r} on http://{host}:{port}/v1 "
          f"(ready when GET /ready answers 200)", file=sys.stderr, flush=True)
    config = uvicorn.Config(build_app(follower, settings), log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
