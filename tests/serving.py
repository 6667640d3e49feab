"""Helpers for the server tests: a tiny model made for serving (long context, a chat template, no EOS, so every
answer runs to max_tokens and a long one takes seconds), its routing bundle, and a live uvicorn server on an
ephemeral loopback port in a background thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from knnssd.models import LoadedModel, load_model
from knnssd.serve.app import build_app
from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.bundles import TINY_PROMPTS, tiny_bundle
from tests.test_models import save_tiny

CONTEXT = 4096
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPTS = [TINY_PROMPTS["low"][0], TINY_PROMPTS["high"][1], TINY_PROMPTS["low"][3], TINY_PROMPTS["high"][4]]


def save_serving_model(folder: Path) -> Path:
    """The tests' tiny Llama with a 4096-token context, no EOS and a chat template on its word-level tokenizer."""
    from transformers import AutoTokenizer

    save_tiny(folder, max_position_embeddings=CONTEXT, eos_token_id=None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> LoadedModel:
    folder = save_serving_model(tmp_path_factory.mktemp("model") / "tiny-serve")
    return load_model(str(folder), device="cpu", threads=1)


@pytest.fixture(scope="module")
def bundle_folder(served_model, tmp_path_factory) -> Path:
    return tiny_bundle(served_model, tmp_path_factory.mktemp("bundle") / "tiny-bundle")


class LiveServer:
    """`build_app` on uvicorn, 127.0.0.1, an ephemeral port, in a thread; ready (warmed up) on entry."""

    def __init__(self, follower: Follower, settings: ServeSettings = ServeSettings()) -> None:
        self.app = build_app(follower, settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        while httpx.get(self.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, parsed by prometheus_client's parser: {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
