"""Helpers for the server tests: a tiny model made for serving (long context, a chat template, no EOS, so every
answer runs to max_tokens and a long one takes seconds), its routing bundle, and a live uvicorn server on an
ephemeral loopback port in a background thread."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from knnssd.bundle.runtime import BundleRuntime, load_bundle
from knnssd.engine.models import LoadedModel, load_model
from knnssd.engine.sampling import SamplingConfig
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


@pytest.fixture(scope="module")
def runtime(bundle_folder, served_model) -> BundleRuntime:
    """The bundle loaded in this process, for one-at-a-time reference answers (`sequential_answer`)."""
    return load_bundle(str(bundle_folder), model=served_model)


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


@dataclass(frozen=True)
class Spec:
    """One request of a load test."""

    prompt: int
    max_tokens: int
    chat: bool
    stream: bool
    seed: int | None  # None: greedy; else sampled at temperature 0.8 with this seed

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": PROMPTS[self.prompt]}]

    def sampling(self) -> SamplingConfig:
        return SamplingConfig() if self.seed is None else SamplingConfig(temperature=0.8, seed=self.seed)


def load_specs(count: int, max_tokens: tuple[int, int] = (60, 200)) -> list[Spec]:
    """`count` varied requests: completions and chat, streamed and not, greedy and seeded sampling."""
    low, high = max_tokens
    return [Spec(prompt=i % len(PROMPTS), max_tokens=low + (i * 37) % (high - low), chat=i % 3 == 1,
                 stream=i % 2 == 1, seed=None if i % 4 < 2 else 100 + i) for i in range(count)]


def sequential_answer(runtime, spec: Spec) -> str:
    """The text one request gets alone, through the bundle runtime in this process."""
    ids = runtime.encode_chat(spec.messages()) if spec.chat else \
        runtime.loaded.tokenizer(PROMPTS[spec.prompt], return_tensors="pt")["input_ids"]
    return runtime.generate(ids, max_new_tokens=spec.max_tokens, sampling=spec.sampling()).text


@dataclass(frozen=True)
class Outcome:
    """What one load-test request got: its text and extension field, or a refusal (status, Retry-After)."""

    spec: Spec
    text: str | None = None
    knnssd: dict | None = None
    status: int = 200
    retry_after: str | None = None


def send(client, model: str, spec: Spec) -> Outcome:
    import openai

    options = dict(model=model, max_tokens=spec.max_tokens, temperature=0.0 if spec.seed is None else 0.8,
                   seed=spec.seed, stream=spec.stream)
    try:
        if spec.chat:
            out = client.chat.completions.create(messages=spec.messages(), **options)
        else:
            out = client.completions.create(prompt=PROMPTS[spec.prompt], **options)
        if not spec.stream:
            choice = out.choices[0]
            return Outcome(spec, choice.message.content if spec.chat else choice.text, out.knnssd)
        chunks = list(out)
        text = "".join((c.choices[0].delta.content or "") if spec.chat else c.choices[0].text
                       for c in chunks if c.choices)
        return Outcome(spec, text, chunks[-1].knnssd)
    except openai.APIStatusError as exc:
        return Outcome(spec, status=exc.status_code, retry_after=exc.response.headers.get("retry-after"))


def run_load(server: LiveServer, model: str, specs: list[Spec], clients: int, seconds: float,
             between=None) -> list[Outcome]:
    """`specs` sent by `clients` concurrent clients (each its own connection pool), each in turn; `between(i)`
    runs after the i-th answer of client 0 (to move an alias mid-load). Bounded: every request must be answered
    within `seconds` all together."""
    shares = [specs[i::clients] for i in range(clients)]

    def client_run(index: int) -> list[Outcome]:
        client = server.client(timeout=seconds)
        outcomes = []
        for i, spec in enumerate(shares[index]):
            outcomes.append(send(client, model, spec))
            if between is not None and index == 0:
                between(i)
        return outcomes

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_run, i) for i in range(clients)]
        done, pending = wait(futures, timeout=seconds)
        assert not pending, f"{len(pending)} clients still waiting after {seconds} s: a request hung"
    return [outcome for future in futures for outcome in future.result()]
