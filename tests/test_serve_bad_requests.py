"""The sweep of bad requests: each gets an OpenAI-style error body with the right status, never a traceback, and
the server answers good requests after it."""

from __future__ import annotations

import json

import httpx
import pytest

from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.serving import CONTEXT, PROMPTS, LiveServer, bundle_folder, served_model  # noqa: F401 (fixtures)

NAME = "tiny-bundle"
MAX_BODY = 64 * 1024
GOOD = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 4}
C, CC = "/v1/completions", "/v1/chat/completions"

SWEEP = [  # (what, path, body, status, param, code)
    ("malformed JSON", C, b'{"model": "tiny-bundle", ', 400, None, "invalid_json"),
    ("not an object", C, b"[1, 2]", 400, None, "invalid_json"),
    ("missing model", C, {"prompt": "t5"}, 400, "model", "missing_required_field"),
    ("missing prompt", C, {"model": NAME}, 400, "prompt", "missing_required_field"),
    ("missing messages", CC, {"model": NAME}, 400, "messages", "missing_required_field"),
    ("no messages", CC, {**CHAT, "messages": []}, 400, "messages", "invalid_value"),
    ("max_tokens as a string", C, {**GOOD, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("max_tokens as a float", C, {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ("temperature as a string", C, {**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("temperature above 2", C, {**GOOD, "temperature": 3}, 400, "temperature", "invalid_value"),
    ("top_p of 0", C, {**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("stream as a string", C, {**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("seed as a string", C, {**GOOD, "seed": "7"}, 400, "seed", "invalid_type"),
    ("seed of 2**70", C, {**GOOD, "seed": 2**70}, 400, "seed", "invalid_value"),
    ("seed of 2**64", CC, {**CHAT, "seed": 2**64}, 400, "seed", "invalid_value"),
    ("negative seed", C, {**GOOD, "seed": -1}, 400, "seed", "invalid_value"),
    ("tool role", CC, {**CHAT, "messages": [{"role": "tool", "content": "t5"}]}, 400, "messages.0.role",
     "invalid_value"),
    ("content as a number", CC, {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content",
     "invalid_type"),
    ("image content", CC, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content", "invalid_value"),
    ("max_tokens 0", C, {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_tokens negative", C, {**GOOD, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("max_tokens above the context", C, {**GOOD, "max_tokens": CONTEXT}, 400, "max_tokens",
     "context_length_exceeded"),
    ("max_completion_tokens 0", CC, {**CHAT, "max_completion_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("prompt longer than the context", C, {**GOOD, "prompt": " ".join(["t5"] * (CONTEXT + 10))}, 400, "prompt",
     "context_length_exceeded"),
    ("empty prompt", C, {**GOOD, "prompt": " "}, 400, "prompt", "invalid_value"),
    ("token id outside the vocabulary", C, {**GOOD, "prompt": [5, 999]}, 400, "prompt", "invalid_value"),
    ("several prompts", C, {**GOOD, "prompt": ["t5", "t6"]}, 400, "prompt", "unsupported_parameter"),
    ("unknown model", C, {**GOOD, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("n > 1", C, {**GOOD, "n": 2}, 400, "n", "unsupported_parameter"),
    ("best_of > 1", C, {**GOOD, "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("logprobs", C, {**GOOD, "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("chat logprobs", CC, {**CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("tools", CC, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ("tool_choice", CC, {**CHAT, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
    ("json response format", CC, {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ("five stop strings", C, {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("oversized body", C, {**GOOD, "prompt": "t5 " * MAX_BODY}, 413, None, "request_too_large"),
    ("unknown route", "/v1/embeddings", GOOD, 404, None, "not_found"),
    ("admin reload while off", "/admin/reload", {}, 404, None, "not_found"),
]


@pytest.fixture(scope="module")
def server(bundle_folder):
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), ServeSettings(max_body_bytes=MAX_BODY)) \
            as live:
        yield live


def check_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["message"] and "Traceback" not in error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


@pytest.mark.parametrize("what,path,body,status,param,code", SWEEP, ids=[case[0] for case in SWEEP])
def test_bad_request(server, what, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                          timeout=30)
    error = check_error(response, status, param, code)
    assert error["type"] == "invalid_request_error"


def test_the_unsupported_option_is_named(server):
    error = httpx.post(server.url + C, json={**GOOD, "n": 3}).json()["error"]
    assert "n > 1" in error["message"] and "n=3" in error["message"]


def test_the_seed_range_is_named_and_its_ends_are_served(server):
    error = httpx.post(server.url + C, json={**GOOD, "seed": 2**70}).json()["error"]
    assert "from 0 to 2**64 - 1" in error["message"] and str(2**70) in error["message"]
    for seed in (0, 2**63, 2**64 - 1):  # both ends and past int64: torch's generator takes them all
        response = httpx.post(server.url + C, json={**GOOD, "temperature": 0.8, "seed": seed}, timeout=30)
        assert response.status_code == 200, response.text


def test_oversized_body_without_content_length(server):
    def chunks():
        for _ in range(4):
            yield b" " * MAX_BODY  # JSON whitespace: only its size is wrong
    response = httpx.post(server.url + C, content=chunks(), headers={"Content-Type": "application/json"})
    check_error(response, 413, None, "request_too_large")


def test_wrong_method_and_stream_errors(server):
    check_error(httpx.get(server.url + C), 405, None, None)
    # a refused streamed request is refused before the stream starts: a plain error body, not an event stream
    check_error(httpx.post(server.url + C, json={**GOOD, "max_tokens": 0, "stream": True}), 400, "max_tokens",
                "invalid_value")


def test_good_requests_still_answered_after_the_sweep(server):
    response = httpx.post(server.url + C, json=GOOD)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    response = httpx.post(server.url + CC, json=CHAT)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
