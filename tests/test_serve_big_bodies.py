"""A body of about 3 MiB (a server started with three times the default --max-body-bytes) is parsed and
tokenised off the event loop (seconds of work): /health answers at once meanwhile, and the big request still
gets its answer. Three times the default, because a body at the default limit took only 0.23 s on a 2-core
AVX-512 machine (2026-12-04), too little for /health's latency to show whether the loop was blocked; not more,
because parsing the JSON holds the GIL, so /health's latency grows with the body too (0.26 s at four times)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.serving import LiveServer, bundle_folder, served_model  # noqa: F401 (fixtures)

NAME = "tiny-bundle"
LIMIT = 3 * ServeSettings.max_body_bytes


@pytest.fixture(scope="module")
def server(bundle_folder):
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), ServeSettings(max_body_bytes=LIMIT)) as live:
        yield live


def big_body(path: str) -> bytes:
    """Just under `LIMIT`: a completion prompt of about 800k words, or a chat of 60k+ messages."""
    if path == "/v1/completions":
        words, body = 270_000 * LIMIT // ServeSettings.max_body_bytes, {}
        while True:
            body = {"model": NAME, "prompt": " ".join(f"t{i % 120}" for i in range(words)), "max_tokens": 1}
            if len(json.dumps(body)) <= LIMIT - 1000:
                return json.dumps(body).encode()
            words -= 10_000
    turn = {"role": "user", "content": "t5 t6 t7 t8 t9 t10 t11 t12"}
    count = (LIMIT - 1000) // (len(json.dumps({**turn, "role": "assistant"})) + 2)
    messages = [{**turn, "role": "user" if i % 2 == 0 else "assistant"} for i in range(count)]
    return json.dumps({"model": NAME, "messages": messages, "max_tokens": 1}).encode()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_big_body_is_tokenised(server, path):
    body = big_body(path)
    assert LIMIT // 2 < len(body) <= LIMIT
    outcome: dict = {}

    def send() -> None:
        start = time.monotonic()
        outcome["response"] = httpx.post(server.url + path, content=body, timeout=120,
                                         headers={"Content-Type": "application/json"})
        outcome["seconds"] = time.monotonic() - start

    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    with httpx.Client(timeout=30) as http:
        while sender.is_alive():
            start = time.monotonic()
            assert http.get(server.url + "/health").json() == {"status": "ok"}
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    sender.join()
    response, seconds = outcome["response"], outcome["seconds"]
    # the prompt is far longer than the model's context: the answer says so, after tokenising all of it
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert seconds > 0.5, f"the big body took only {seconds:.2f} s: too little to show anything"
    print(f"\n{path}: {len(body)} bytes in {seconds:.2f} s, /health at most {max(latencies):.3f} s")
    # a blocked event loop would hold /health for all of `seconds`; off the loop it waits at most for one call
    # that holds the GIL (parsing or validating the body: up to about a third of the work for a 60k-message chat)
    assert len(latencies) >= 5 and max(latencies) < max(0.3, seconds / 2), \
        f"/health took up to {max(latencies):.2f} s while a {seconds:.2f} s body was prepared"
