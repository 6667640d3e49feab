"""Load on loopback: 48 requests from 8 concurrent clients against a batch of 2 and a queue of 3. Every request is
answered with its sequential answer (greedy and seeded sampling, streamed or not, batched with whatever ran beside
it) or refused with a clean 429 and Retry-After; none hangs; the gauges return to zero."""

from __future__ import annotations

import time

from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.serving import (LiveServer, bundle_folder, load_specs, run_load, runtime,  # noqa: F401
                           sequential_answer, served_model)

NAME = "tiny-bundle"


def test_48_requests_from_8_clients(bundle_folder, runtime):
    specs = load_specs(48)
    expected = {spec: sequential_answer(runtime, spec) for spec in specs}
    settings = ServeSettings(max_batch=2, max_queue=3, request_timeout=60)
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), settings) as server:
        start = time.monotonic()
        outcomes = run_load(server, NAME, specs, clients=8, seconds=120)
        elapsed = time.monotonic() - start
        metrics = server.metrics()
    assert len(outcomes) == 48
    answered = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    for outcome in answered:
        assert outcome.text == expected[outcome.spec], outcome.spec
        assert outcome.knnssd["bundle"] == NAME
    for outcome in refused:
        assert outcome.status == 429 and int(outcome.retry_after) >= 1, outcome
    assert answered and refused, f"{len(answered)} answered, {len(refused)} refused: the test should see both"
    assert any(o.spec.seed is not None for o in answered) and any(o.spec.stream for o in answered)

    def total(status: str) -> float:
        return sum(v for (name, labels), v in metrics.items() if name == "knnssd_requests_total"
                   and dict(labels)["status"] == status and dict(labels)["endpoint"] != "/v1/models")
    assert (total("200"), total("429")) == (len(answered), len(refused))
    assert metrics[("knnssd_queue_depth", ())] == 0 and metrics[("knnssd_requests_running", ())] == 0
    print(f"\n48 requests, 8 clients, batch 2, queue 3: {len(answered)} answered, {len(refused)} refused with 429, "
          f"{elapsed:.1f} s")


def test_a_sequential_client_is_never_refused(bundle_folder):
    """--max-queue 0 admits only the request being generated: a client that waits for each answer before it
    sends the next must still never see a 429 (the slot is freed before the answer leaves the server)."""
    specs = [spec for spec in load_specs(12, max_tokens=(2, 6))]
    settings = ServeSettings(max_queue=0, request_timeout=60)
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), settings) as server:
        outcomes = run_load(server, NAME, specs, clients=1, seconds=120)
    assert [o.status for o in outcomes] == [200] * len(specs), [o for o in outcomes if o.status != 200]
