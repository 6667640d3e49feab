"""A chat template that rejects the messages (Jinja's raise_exception, as Llama 2's and Mistral's templates do for
a system role or roles that do not alternate) is an OpenAI 400 naming `messages`, counted in the metrics; the
server answers the messages the template takes."""

from __future__ import annotations

import httpx
import pytest

from knnssd.serve.follow import Follower
from tests.serving import PROMPTS, LiveServer, bundle_folder, served_model  # noqa: F401 (fixtures)

NAME = "tiny-bundle"
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['content'] }} {% endfor %}")


@pytest.fixture(scope="module")
def server(bundle_folder):
    follower = Follower(str(bundle_folder), device="cpu", threads=1)  # its own model and tokenizer
    follower.current.runtime.loaded.tokenizer.chat_template = STRICT_TEMPLATE
    with LiveServer(follower) as live:
        yield live


def chat(server, messages, stream=False) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=30,
                      json={"model": NAME, "messages": messages, "max_tokens": 4, "stream": stream})


@pytest.mark.parametrize("messages,words", [
    ([{"role": "system", "content": "t9"}, {"role": "user", "content": PROMPTS[0]}], "System role not supported"),
    ([{"role": "user", "content": PROMPTS[0]}, {"role": "user", "content": PROMPTS[1]}], "roles must alternate"),
], ids=["system role", "roles that do not alternate"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_rejected_conversation_is_an_openai_400(server, messages, words, stream):
    key = ("knnssd_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "400")))
    before = server.metrics().get(key, 0)
    response = chat(server, messages, stream)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "messages", "invalid_value")
    assert words in error["message"] and "chat template rejected" in error["message"]
    assert server.metrics()[key] == before + 1


def test_a_conversation_the_template_takes_is_answered(server):
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "t5"},
                {"role": "user", "content": PROMPTS[1]}]
    response = chat(server, messages)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
