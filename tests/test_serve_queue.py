"""A waiting client that leaves gives its slot back at once: with --max-queue 1 and a long generation running, a
second client waits, a third gets 429; once the waiting one disconnects (non-streamed, then streamed) a new client
is admitted while the first generation is still running."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.serving import PROMPTS, LiveServer, bundle_folder, served_model  # noqa: F401 (fixtures)

NAME = "tiny-bundle"
# long enough to outlast the clients that wait behind it (3-5 s): 1,500 tokens once took some 20 s, but under 4 s
# on a 2-core AVX-512 machine with the engine's kernels (2026-12-04), so nearly the tiny model's whole context
LONG = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 3800, "temperature": 0}
SHORT = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0}


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_waiting_client_that_leaves_frees_its_slot_at_once(bundle_folder):
    settings = ServeSettings(max_batch=1, max_queue=1, request_timeout=120)  # one generating: the queue's behaviour
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), settings) as server:
        running = threading.Event()
        finished = threading.Event()

        def long_generation() -> None:  # the generation everyone else waits behind, read to its end
            with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True},
                              timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        running.set()
            finished.set()

        first = threading.Thread(target=long_generation)
        first.start()
        assert running.wait(30), "the long generation did not start"

        def gauge(name: str) -> float:
            return server.metrics()[(name, ())]

        # a non-streamed client waits (the one queue place; one more is refused), then leaves
        left = threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, httpx.post, server.url +
                                                             "/v1/completions", json=SHORT, timeout=3.0))
        left.start()
        wait_for(lambda: gauge("knnssd_queue_depth") == 1, 3, "the client to wait")
        refused = httpx.post(server.url + "/v1/completions", json=SHORT, timeout=5)
        assert refused.status_code == 429, refused.text
        left.join()
        wait_for(lambda: gauge("knnssd_queue_depth") == 0, 1, "the waiting client's slot")
        assert not finished.is_set() and gauge("knnssd_requests_running") == 1

        # a streamed client is admitted now (not 429), waits, and leaves
        with httpx.stream("POST", server.url + "/v1/completions", json={**SHORT, "stream": True},
                          timeout=30) as waiting:
            assert waiting.status_code == 200
            assert gauge("knnssd_queue_depth") == 1
            refused = httpx.post(server.url + "/v1/completions", json=SHORT, timeout=5)
            assert refused.status_code == 429, refused.text
        wait_for(lambda: gauge("knnssd_queue_depth") == 0, 2, "the streamed waiting client's slot")

        # and the next one is admitted, still while the first generation runs
        with httpx.stream("POST", server.url + "/v1/completions", json={**SHORT, "stream": True},
                          timeout=120) as admitted:
            assert admitted.status_code == 200 and not finished.is_set()
            text = "".join(admitted.iter_text())  # answered once the long generation is over
        assert finished.is_set() and text.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in text
        first.join(30)
        metrics = server.metrics()
        assert metrics[("knnssd_queue_depth", ())] == 0 and metrics[("knnssd_requests_running", ())] == 0
