"""The server batches: 8 concurrent `openai` clients (completions and chat, streamed and not, greedy and seeded
sampling, prompts of both of the bundle's domains) against a live server with --max-batch 8. Every answer equals
its one-at-a-time answer, and /metrics shows steps that verified more than one request together, with the drafted
and accepted tokens per request-step counted."""

from __future__ import annotations

from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.serving import (LiveServer, bundle_folder, load_specs, run_load, runtime,  # noqa: F401
                           sequential_answer, served_model)

NAME = "tiny-bundle"


def test_8_concurrent_clients_are_batched_and_answered_as_alone(bundle_folder, runtime):
    specs = load_specs(24, max_tokens=(40, 120))
    expected = {spec: sequential_answer(runtime, spec) for spec in specs}
    settings = ServeSettings(max_batch=8, max_queue=16, request_timeout=120)
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), settings) as server:
        outcomes = run_load(server, NAME, specs, clients=8, seconds=300)
        metrics = server.metrics()
    assert [o.status for o in outcomes] == [200] * len(specs)
    for outcome in outcomes:
        assert outcome.text == expected[outcome.spec], outcome.spec
    domains = {o.knnssd["domain"] for o in outcomes}
    assert len(domains) >= 2, domains  # both domains (two policies) were served while 8 clients were batched

    def sample(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    steps = sample("knnssd_batch_size_count")
    single = sample("knnssd_batch_size_bucket", le="1.0")
    assert steps > 0 and single < steps, (single, steps)  # some steps verified 2 or more requests together
    assert sample("knnssd_batch_size_sum") / steps > 1.5
    request_steps = sample("knnssd_step_drafted_tokens_count")
    assert request_steps == sample("knnssd_step_accepted_tokens_count") and request_steps > steps
    assert sample("knnssd_step_accepted_tokens_sum") <= sample("knnssd_step_drafted_tokens_sum")
    assert metrics[("knnssd_queue_depth", ())] == 0 and metrics[("knnssd_requests_running", ())] == 0
