"""The same app on Ray Serve (jobs/serve.py): two replicas on a local Ray behind Ray Serve's HTTP proxy, driven by
the openai client; both replicas answer, each answer equals plain decoding, /metrics parses."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.serve.settings import ServeSettings
from tests.conftest import REPO_ROOT
from tests.serving import PROMPTS, bundle_folder, served_model  # noqa: F401 (fixtures)
from tests.services import free_port


@pytest.fixture(scope="module")
def ray_serve():
    """A local Ray of its own on 2 CPUs (as tests/test_calibrate_job.py starts one; $KNNSSD_TEST_RAY_ADDRESS is
    a job API for `ray job submit`, not a driver address) with Ray Serve's proxy on a free loopback port."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}  # replicas import jobs.serve from this checkout
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=env)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_behind_the_proxy(ray_serve, bundle_folder, served_model):
    from openai import OpenAI
    from ray import serve

    from jobs.serve import deployment

    application = deployment(str(bundle_folder), ServeSettings(max_queue=8), replicas=2, replica_cpus=0.5,
                             load_options={"threads": 1})
    serve.run(application, name="knnssd", route_prefix="/")
    deadline = time.monotonic() + 120
    while httpx.get(ray_serve + "/ready").status_code != 200:  # the proxy answers once a replica is up
        assert time.monotonic() < deadline, "Ray Serve's replicas did not get ready"
        time.sleep(0.5)
    replicas = serve.status().applications["knnssd"].deployments["knnssd"].replica_states
    assert replicas.get("RUNNING") == 2, replicas

    expected = {}
    for prompt in PROMPTS:
        ids = served_model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        tokens = generate(served_model.model, ids, GenerationConfig(max_new_tokens=48)).token_ids
        expected[prompt] = served_model.tokenizer.decode(list(tokens), skip_special_tokens=True)
    client = OpenAI(base_url=ray_serve + "/v1", api_key="unused", max_retries=0, timeout=60)

    def ask(i: int) -> tuple[str, str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        raw = client.completions.with_raw_response.create(model="tiny-bundle", prompt=prompt, max_tokens=48,
                                                          temperature=0)
        return prompt, raw.parse().choices[0].text, raw.headers["x-knnssd-server"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    assert all(text == expected[prompt] for prompt, text, _ in answers)
    servers = {server for _, _, server in answers}
    assert len(servers) == 2, servers  # both replicas answered
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-bundle", prompt=PROMPTS[0], max_tokens=48, temperature=0, stream=True))
    assert streamed == expected[PROMPTS[0]]

    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name for f in text_string_to_metric_families(httpx.get(ray_serve + "/metrics").text)}
    assert {"knnssd_requests", "knnssd_time_to_first_token_seconds", "knnssd_spec_decode_num_draft_tokens"} \
        <= families
    serve.delete("knnssd")


def test_replicas_get_the_drivers_trusted_keys_by_content(bundle_folder, tmp_path, monkeypatch):
    """A replica on another node has neither the driver's $KNNSSD_TRUSTED_KEYS nor its key files: the driver
    sends the keys' contents, and a replica given them refuses an unsigned bundle (no Ray needed to show it)."""
    from knnssd.serve.follow import Follower
    from knnssd.bundle.signing import SignatureError, generate_key_pair, key_contents, keys_from_contents

    _, public = generate_key_pair(tmp_path / "release")
    monkeypatch.setenv("KNNSSD_TRUSTED_KEYS", str(public))
    pems = key_contents(None)  # what deployment() sends: the driver's environment's keys
    assert pems == [public.read_text()]
    monkeypatch.delenv("KNNSSD_TRUSTED_KEYS")  # the replica's own environment has no key
    with keys_from_contents(pems) as keys, pytest.raises(SignatureError):  # what the replica's constructor does
        Follower(str(bundle_folder), device="cpu", trusted_keys=keys)
    assert key_contents(None) == []  # none configured: none sent


def test_the_proxy_sheds_what_its_queue_cannot_hold(ray_serve, bundle_folder, served_model):
    """One replica with --max-batch 1 --max-queue 1 holds 2 requests, the proxy 1 more: of 8 sent at once, the excess is
    refused by the proxy within a second or two with 429 and Retry-After, and the rest are answered correctly."""
    import openai
    from openai import OpenAI
    from ray import serve

    from jobs.serve import SHED_RETRY_AFTER_SECONDS, deployment

    serve.run(deployment(str(bundle_folder), ServeSettings(max_batch=1, max_queue=1), replicas=1, replica_cpus=0.5,
                         load_options={"threads": 1}), name="knnssd", route_prefix="/")
    try:
        deadline = time.monotonic() + 120
        while httpx.get(ray_serve + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "Ray Serve's replica did not get ready"
            time.sleep(0.5)
        ids = served_model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        tokens = generate(served_model.model, ids, GenerationConfig(max_new_tokens=300)).token_ids
        expected = served_model.tokenizer.decode(list(tokens), skip_special_tokens=True)
        client = OpenAI(base_url=ray_serve + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(i: int) -> tuple[int, float, str | None, str]:
            start = time.monotonic()
            try:
                out = client.completions.create(model="tiny-bundle", prompt=PROMPTS[0], max_tokens=300,
                                                temperature=0)
                return 200, time.monotonic() - start, None, out.choices[0].text
            except openai.APIStatusError as exc:
                return exc.status_code, time.monotonic() - start, exc.response.headers.get("retry-after"), \
                    exc.response.text

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(ask, range(8)))
        answered = [o for o in outcomes if o[0] == 200]
        shed = [o for o in outcomes if o[0] != 200]
        print("\n" + "\n".join(f"{status} after {seconds:.1f} s" for status, seconds, _, _ in outcomes))
        # 2 on the replica + 1 at the proxy, and Ray's queue check can admit one more before it counts it
        # (seen: "num_queued_requests=2, max_queued_requests=1" with 4 answered)
        assert 1 <= len(answered) <= 4 and len(shed) == 8 - len(answered) >= 4, outcomes
        assert all(text == expected for _, _, _, text in answered)
        slowest_answer = max(seconds for _, seconds, _, _ in answered)
        for status, seconds, retry_after, _ in shed:
            assert status == 429 and retry_after == str(SHED_RETRY_AFTER_SECONDS)
            assert seconds < min(3.0, slowest_answer / 2), f"shed after {seconds:.1f} s: it queued"
        # once the load is gone, a request is answered again
        assert client.completions.create(model="tiny-bundle", prompt=PROMPTS[1], max_tokens=4, temperature=0).usage
    finally:
        serve.delete("knnssd")
