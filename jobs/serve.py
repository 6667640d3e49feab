"""Serve a routing bundle on Ray Serve: the app of `knnssd serve` (knnssd/serve/app.py) in every replica, each
replica holding the bundle and its model, behind Ray Serve's HTTP proxy; same API, same metrics per replica.

    python jobs/serve.py --bundle smollm2-135m@production --replicas 2 --port 8000
    python jobs/serve.py --bundle smollm2-135m@production --min-replicas 1 --max-replicas 4   # autoscaling
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/serve.py --bundle smollm2-135m@production --replicas 2
    serve run --working-dir . jobs.serve:app bundle=smollm2-135m@production replicas=2

Each replica follows the registry alias on its own (`--refresh-seconds`), so a moved alias reaches every
replica within one refresh. Requests are routed by Ray Serve to the replica with fewer ongoing requests; a
replica is sent at most `--max-batch` + `--max-queue` (its own bound, as Ray Serve's `max_ongoing_requests`), and
each replica batches like the standalone server: up to `--max-batch` requests generate together, their drafts
verified in one forward pass per step.

Load shedding: while every replica is full, Ray Serve's proxy holds at most max(1, `--max-queue`) more requests
(`max_queued_requests`); past that it answers at once with 429, a `Retry-After: 1` header and a plain-text body
(Ray Serve's own, not an OpenAI error body: the `openai` client raises RateLimitError). A replica's own 429 (the
standalone server's shedding) is then only a safety net. The proxy also ends a request `--request-timeout` +
PROXY_GRACE_SECONDS after it reached the proxy (408, plain text), so time queued at the proxy counts too; the
replica's own 504 counts from the request's arrival at the replica.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout or a Ray working dir

from ray import serve  # noqa: E402
from ray.serve.config import BackpressureConfig  # noqa: E402

from knnssd.cli.entry import ArgumentParser, add_engine_flags, run_main  # noqa: E402
from knnssd.errors import KnnSsdError  # noqa: E402
from knnssd.cli.bundles import TRACKING_HELP  # noqa: E402
from knnssd.cli.serve import BUNDLE_HELP, add_serving_flags, settings_from  # noqa: E402
from knnssd.serve.settings import ServeSettings  # noqa: E402
from knnssd.bundle.signing import key_contents, keys_from_contents  # noqa: E402

# Ray Serve scales up when replicas average more ongoing requests than this (a batch of a few generates).
TARGET_ONGOING_REQUESTS = 4
SHED_RETRY_AFTER_SECONDS = 1  # the Retry-After of the proxy's 429
PROXY_GRACE_SECONDS = 5.0  # past --request-timeout, the proxy ends a request the replica has not ended


def queue_options(settings: ServeSettings) -> dict[str, Any]:
    """The deployment options that bound the work in flight: per replica, `max_batch` generating and `max_queue`
    waiting; at the proxy, max(1, `max_queue`) more (Ray Serve takes no 0 here); past that, 429 at once."""
    return {"max_ongoing_requests": settings.max_batch + settings.max_queue,
            "max_queued_requests": max(1, settings.max_queue),
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=SHED_RETRY_AFTER_SECONDS)}


def http_options(settings: ServeSettings) -> dict[str, Any]:
    """Ray Serve's proxy: where it listens, and its end-to-end timeout (counted from the request's arrival)."""
    return {"host": settings.host, "port": settings.port,
            "request_timeout_s": settings.request_timeout + PROXY_GRACE_SECONDS}


@serve.deployment(name="knnssd")
@serve.ingress()
class KnnSsdServer:
    """One replica: the bundle loaded and verified in the constructor, the FastAPI app built on it."""

    def __init__(self, bundle: str, settings: dict[str, Any] | None = None, tracking_uri: str | None = None,
                 load_options: dict[str, Any] | None = None) -> None:
        from knnssd.cli.entry import quiet_loaders
        from knnssd.serve.follow import Follower

        quiet_loaders()
        self.settings = ServeSettings(**(settings or {}))
        options = dict(load_options or {})
        # The driver's trusted keys, as files of this replica's own for as long as it serves (`deployment`).
        self._keys = contextlib.ExitStack()
        options["trusted_keys"] = self._keys.enter_context(keys_from_contents(options.pop("trusted_key_pems", [])))
        self.follower = Follower(bundle, tracking_uri, **options)

    def __serve_build_asgi_app__(self) -> Any:
        from knnssd.serve.app import build_app

        return build_app(self.follower, self.settings)


def deployment(bundle: str, settings: ServeSettings = ServeSettings(), replicas: int = 1,
               min_replicas: int | None = None, max_replicas: int | None = None, replica_cpus: float = 1.0,
               tracking_uri: str | None = None, load_options: dict[str, Any] | None = None) -> Any:
    """The Ray Serve application: `replicas` fixed replicas, or autoscaling between `min_replicas` and
    `max_replicas` on ongoing requests; each replica asks for `replica_cpus` CPUs (fractions allowed)."""
    if max_replicas is not None:
        low = 1 if min_replicas is None else min_replicas
        if not 0 <= low <= max_replicas or max_replicas < 1:
            raise KnnSsdError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                              f"{low} and {max_replicas}", fix="e.g. --min-replicas 1 --max-replicas 4")
        scaling: dict[str, Any] = {"autoscaling_config": {"min_replicas": low, "max_replicas": max_replicas,
                                                          "target_ongoing_requests": max(1, min(
                                                              TARGET_ONGOING_REQUESTS,
                                                              settings.max_batch + settings.max_queue))}}
    elif replicas >= 1:
        scaling = {"num_replicas": replicas}
    else:
        raise KnnSsdError(f"--replicas must be >= 1, got {replicas}", fix="e.g. --replicas 2")
    if not replica_cpus > 0:
        raise KnnSsdError(f"--replica-cpus must be > 0, got {replica_cpus}", fix="e.g. --replica-cpus 1")
    fields = {name: getattr(settings, name) for name in ("max_batch", "max_queue", "request_timeout",
                                                          "refresh_seconds", "admin_token", "max_body_bytes")}
    load_options = dict(load_options or {})  # the trusted keys resolved here, sent by content
    load_options["trusted_key_pems"] = key_contents(load_options.pop("trusted_keys", None))
    return KnnSsdServer.options(**queue_options(settings), ray_actor_options={"num_cpus": replica_cpus},
                                **scaling).bind(
        bundle, fields, tracking_uri, load_options)


def app(args: dict[str, str]) -> Any:
    """Builder for `serve run jobs.serve:app bundle=REF [replicas=N] [replica_cpus=C] [tracking_uri=URI]
    [threads=T] [max_batch=B] [max_queue=Q] [refresh_seconds=S]`."""
    if "bundle" not in args:
        raise KnnSsdError("serve run jobs.serve:app needs bundle=REF", fix="e.g. serve run jobs.serve:app "
                          "bundle=smollm2-135m@production")
    settings = ServeSettings(max_batch=int(args.get("max_batch", ServeSettings.max_batch)),
                             max_queue=int(args.get("max_queue", ServeSettings.max_queue)),
                             refresh_seconds=float(args.get("refresh_seconds", ServeSettings.refresh_seconds)))
    options = {"threads": int(args["threads"])} if "threads" in args else {}
    return deployment(args["bundle"], settings, replicas=int(args.get("replicas", 1)),
                      replica_cpus=float(args.get("replica_cpus", 1.0)), tracking_uri=args.get("tracking_uri"),
                      load_options=options)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Serve a routing bundle on Ray Serve: the app of knnssd serve in every "
                                        "replica, behind Ray Serve's HTTP proxy.")
    parser.add_argument("--bundle", required=True, help=BUNDLE_HELP)
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started here).")
    parser.add_argument("--host", default=ServeSettings.host, help="Ray Serve's HTTP proxy address.")
    parser.add_argument("--port", type=int, default=ServeSettings.port, help="Ray Serve's HTTP proxy port.")
    parser.add_argument("--replicas", type=int, default=1, help="fixed number of replicas.")
    parser.add_argument("--min-replicas", type=int, default=None,
                        help="with --max-replicas: the fewest replicas autoscaling keeps (default: 1).")
    parser.add_argument("--max-replicas", type=int, default=None,
                        help=f"autoscale up to this many replicas, adding one above {TARGET_ONGOING_REQUESTS} "
                             "ongoing requests per replica.")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica asks Ray for.")
    add_serving_flags(parser)
    add_engine_flags(parser, "each replica")
    return parser


def run(args: argparse.Namespace) -> None:
    from pipeline.cluster import connect

    settings = settings_from(args, args.host, args.port)
    application = deployment(args.bundle, settings, replicas=args.replicas, min_replicas=args.min_replicas,
                             max_replicas=args.max_replicas, replica_cpus=args.replica_cpus,
                             tracking_uri=args.tracking_uri,
                             load_options={"threads": args.threads, "fast_kernels": not args.no_fast_kernels,
                                           "trusted_keys": tuple(args.trusted_key) if args.trusted_key else None})
    connect(args.address)  # run as a script, this module is __main__: Ray ships the deployment class by value
    serve.start(http_options=http_options(settings))
    serve.run(application, name="knnssd", route_prefix="/")
    print(f"serving {args.bundle} on Ray Serve at http://{settings.host}:{settings.port}/v1 (Ctrl-C stops)",
          flush=True)
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def checked() -> int | None:
        from pipeline.cluster import check_job_paths

        check_job_paths({}, {}, ("--tracking-uri", args.tracking_uri))  # a registry in Ray's copy: refused
        return run(args)
    return run_main(checked)


if __name__ == "__main__":
    sys.exit(main())
