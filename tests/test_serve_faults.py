"""A fault of the server's own answers a generic OpenAI 500 naming a request id, with no exception text and no
traceback in the body; the details are in the server's log under that id. The faults are injected (a generation
and a request's preparation that raise), since a working server cannot be made to fail otherwise."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from knnssd.bundle.runtime import BundleRuntime
from knnssd.serve.follow import Follower
from tests.serving import PROMPTS, LiveServer, bundle_folder, served_model  # noqa: F401 (fixtures)

NAME = "tiny-bundle"
SECRET = "secret-detail-/srv/knnssd/app.py-line-42"
GOOD = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(bundle_folder):
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1)) as live:
        yield live


def boom(*args, **kwargs):
    raise RuntimeError(SECRET)


def request_id(error: dict, caplog) -> str:
    """The id the body names, checked to be in the log beside the exception's text."""
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    found = re.search(r"request id (req-[0-9a-f]+)", error["message"])
    assert found, error
    logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert logged and SECRET in (logged[0].exc_text or "") + str(logged[0].exc_info), "details not logged"
    return found.group(1)


def no_leak(text: str) -> None:
    for leak in (SECRET, "Traceback", "RuntimeError", 'File "'):
        assert leak not in text, text


def test_a_failed_generation_is_a_generic_500(server, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="knnssd.serve")
    monkeypatch.setattr(BundleRuntime, "start", boom)  # a fault in the prefill or routing
    response = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=30)
    assert response.status_code == 500
    no_leak(response.text)
    assert response.headers["x-request-id"] == request_id(response.json()["error"], caplog)
    monkeypatch.undo()
    monkeypatch.setattr("knnssd.serve.engine.step", boom)  # a fault in a (batched) decoding step

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "model": NAME, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 4,
            "stream": True}) as streamed:
        text = "".join(streamed.iter_text())
    no_leak(text)
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    request_id(events[-1]["error"], caplog)


def test_a_fault_before_generation_is_a_generic_500_and_counted(server, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="knnssd.serve")
    monkeypatch.setattr("knnssd.serve.app.make_work", boom)
    before = server.metrics()
    response = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=30)
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    no_leak(response.text)
    request_id(response.json()["error"], caplog)
    key = ("knnssd_requests_total", (("endpoint", "/v1/completions"), ("status", "500")))
    assert server.metrics().get(key, 0) == before.get(key, 0) + 1
    monkeypatch.undo()
    assert httpx.post(server.url + "/v1/completions", json=GOOD, timeout=30).status_code == 200
