"""The server through the official `openai` client on a live uvicorn server: completions and chat, streamed and
not, token-identical to plain decoding; sampling through the bundle's rejection sampling; stop strings; the
routing extension field; /health, /ready, /metrics; a client that disconnects; --request-timeout."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.bundle.runtime import load_bundle
from knnssd.engine.sampling import SamplingConfig
from knnssd.serve.follow import Follower
from knnssd.serve.settings import ServeSettings
from tests.serving import CONTEXT, PROMPTS, LiveServer, bundle_folder, served_model  # noqa: F401 (fixtures)

NAME = "tiny-bundle"


@pytest.fixture(scope="module")
def server(bundle_folder):
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1)) as live:
        yield live


@pytest.fixture(scope="module")
def runtime(bundle_folder, served_model):
    return load_bundle(str(bundle_folder), model=served_model)


def plain_text(model, tokenizer, ids: torch.Tensor, n: int) -> tuple[str, int]:
    """Plain greedy decoding (no drafter: token-identical to model.generate, tests/test_lossless.py)."""
    tokens = generate(model, ids, GenerationConfig(max_new_tokens=n)).token_ids
    return tokenizer.decode(list(tokens), skip_special_tokens=True), len(tokens)


def test_plain_decoding_here_is_transformers_generate(served_model):
    ids = served_model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    reference = served_model.model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=0)[0, ids.shape[1]:]
    assert list(generate(served_model.model, ids, GenerationConfig(max_new_tokens=24)).token_ids) == \
        reference.tolist()


def test_health_ready_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "bundle": NAME}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].knnssd["bundle"] == NAME and models.data[0].knnssd["context_length"] == CONTEXT


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_plain_decoding(server, served_model, stream):
    client = server.client()
    for prompt, n in zip(PROMPTS, (40, 7, 64, 1)):
        ids = served_model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected, count = plain_text(served_model.model, served_model.tokenizer, ids, n)
        if stream:
            chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
            info, usage = finals[0].knnssd, chunks[-1].usage
        else:
            out = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)
            text, info, usage = out.choices[0].text, out.knnssd, out.usage
            assert out.choices[0].finish_reason == "length"
        assert text == expected, prompt
        assert (usage.completion_tokens, usage.prompt_tokens) == (count, ids.shape[1]) == (n, ids.shape[1])
        assert info["bundle"] == NAME and info["domain"] in ("low", "high") and info["policy_kind"] == "layer_skip"
        assert 0 <= info["accepted"] <= info["drafted"] and info["verify_steps"] >= 1 or n == 1


def test_token_id_prompt_equals_text_prompt(server, served_model):
    ids = served_model.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    client = server.client()
    by_ids = client.completions.create(model=NAME, prompt=ids[0].tolist(), max_tokens=12, temperature=0)
    by_text = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_plain_decoding_through_the_chat_template(server, served_model, runtime, stream):
    messages = [{"role": "system", "content": "t9 t10"}, {"role": "user", "content": PROMPTS[2]}]
    ids = runtime.encode_chat(messages)
    expected, _ = plain_text(served_model.model, served_model.tokenizer, ids, 30)
    client = server.client()
    if stream:
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].knnssd["bundle"] == NAME
    else:
        out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0)
        text = out.choices[0].message.content
        assert out.usage.prompt_tokens == ids.shape[1] and out.knnssd["verify_steps"] >= 1
    assert text == expected


def test_sampling_is_the_bundles_rejection_sampling_with_the_seed(server, runtime):
    client = server.client()
    ids = runtime.loaded.tokenizer(PROMPTS[3], return_tensors="pt")["input_ids"]
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=11)
    expected = runtime.generate(ids, max_new_tokens=40, sampling=sampling).text
    texts = [client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=40, temperature=0.9, top_p=0.95,
                                       seed=11).choices[0].text for _ in range(2)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=PROMPTS[3], max_tokens=40, temperature=0.9, top_p=0.95, seed=11, stream=True))
    other = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=40, temperature=0.9, top_p=0.95,
                                      seed=12).choices[0].text
    assert texts == [expected, expected] and streamed == expected
    assert other != expected  # a seed really changes the draw (40 tokens from 128 at temperature 0.9)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(server, served_model, stream):
    ids = served_model.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    full, _ = plain_text(served_model.model, served_model.tokenizer, ids, 40)
    words = full.split(" ")
    stop = next(w for w in words[3:] if w != words[0])  # a word that first appears after the start
    cut = full.index(stop)
    client = server.client()
    if stream:
        chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                                stop=[stop, "t999"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=stop)
        text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert out.usage.completion_tokens < 40  # generation stopped at the step that made the stop string
    assert text == full[:cut] and reason == "stop"


def test_metrics_parse_and_count(server):
    client = server.client()
    before = server.metrics()
    client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=0)
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("knnssd_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("knnssd_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("knnssd_generation_tokens_total") == 20
    assert delta("knnssd_time_to_first_token_seconds_count") == 1
    assert delta("knnssd_time_per_output_token_seconds_count") == 1
    drafted = delta("knnssd_spec_decode_num_draft_tokens_total", domain="low")
    accepted = delta("knnssd_spec_decode_num_accepted_tokens_total", domain="low")
    steps = delta("knnssd_spec_decode_verify_steps_total", domain="low")
    per_position = sum(v - before.get(k, 0.0) for k, v in after.items()
                       if k[0] == "knnssd_spec_decode_num_accepted_tokens_per_pos_total" and ("domain", "low") in k[1])
    assert drafted > 0 and 0 <= accepted <= drafted and per_position == accepted
    assert accepted + steps == 20 - 1  # every token after the prefill's is an accepted draft or a step's own
    assert after[("knnssd_queue_depth", ())] == 0 and after[("knnssd_requests_running", ())] == 0
    assert after[("knnssd_bundle_info", (("bundle", NAME),))] == 1


def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_the_slot(server):
    before = server.metrics()
    cancelled = ("knnssd_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))
    generated = ("knnssd_generation_tokens_total", ())
    with httpx.Client(timeout=30) as http:  # a long streamed request, dropped after its first pieces of text
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": CONTEXT - 20, "temperature": 0, "stream": True}
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    wait_for(lambda: server.metrics().get(cancelled, 0) == before.get(cancelled, 0) + 1, 5)
    after = server.metrics()
    assert after[generated] - before[generated] < CONTEXT - 20  # it stopped early: nobody was reading
    assert after[("knnssd_requests_running", ())] == 0
    start = time.monotonic()
    server.client().completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert time.monotonic() - start < 2


def test_a_non_streamed_client_that_disconnects_frees_the_slot(server):
    cancelled = ("knnssd_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))
    before = server.metrics().get(cancelled, 0)
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": CONTEXT - 20, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: server.metrics().get(cancelled, 0) == before + 1, 5)
    assert server.metrics()[("knnssd_requests_running", ())] == 0


def test_request_timeout_is_a_clear_error(bundle_folder):
    settings = ServeSettings(request_timeout=0.5)
    with LiveServer(Follower(str(bundle_folder), device="cpu", threads=1), settings) as live:
        client = live.client()
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=CONTEXT - 20, temperature=0)
        assert caught.value.status_code == 504 and "--request-timeout (0.5 s)" in caught.value.message
        assert time.monotonic() - start < 3
        with pytest.raises(openai.APIError, match="request-timeout"):
            list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=CONTEXT - 20, temperature=0,
                                           stream=True))
        # the slot is free again: a short request is answered at once
        assert client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0).usage
        metrics = live.metrics()
        assert metrics[("knnssd_requests_total", (("endpoint", "/v1/completions"), ("status", "504")))] == 2
