"""`knnssd serve` as a user runs it: a real process serving a bundle folder, stopped by SIGTERM; bad flags, a
missing bundle and a port in use as one `error: ... (fix: ...)` line and exit 2."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from knnssd.errors import KnnSsdError
from knnssd.serve.settings import ServeSettings
from tests.conftest import REPO_ROOT
from tests.serving import PROMPTS, bundle_folder, served_model  # noqa: F401 (fixtures)

KNNSSD = [sys.executable, "-m", "knnssd.cli", "serve"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KNNSSD, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "(fix: " in lines[0] and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("args,words", [
    ((), "--bundle"),
    (("--bundle", "x", "--max-queue", "-1"), "--max-queue must be >= 0"),
    (("--bundle", "./no-such-bundle/"), "does not exist"),
])
def test_bad_flags_and_missing_bundle(args, words):
    assert words in one_error_line(run_cli(*args))


@pytest.mark.parametrize("settings,words", [
    ({"port": 70000}, "--port must be 0-65535"),
    ({"request_timeout": 0}, "--request-timeout must be > 0"),
    ({"refresh_seconds": -1}, "--refresh-seconds must be >= 0"),
    ({"admin_token": "short"}, "at least 8 characters"),
    ({"max_body_bytes": 10}, "--max-body-bytes must be >= 1024"),
])
def test_settings_are_checked(settings, words):
    with pytest.raises(KnnSsdError, match=re.escape(words)):
        ServeSettings(**settings)


def test_port_in_use(bundle_folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run_cli("--bundle", str(bundle_folder), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_serve_a_bundle_folder_until_sigterm(bundle_folder):
    process = subprocess.Popen([*KNNSSD, "--bundle", str(bundle_folder), "--port", "0", "--threads", "1",
                                "--log-level", "info"], stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        url = None
        deadline = time.monotonic() + 90
        while url is None:
            assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", process.stderr.readline())
            url = found.group(1) if found else None
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny-bundle", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert out.usage.completion_tokens == 6 and out.knnssd["bundle"] == "tiny-bundle"
    finally:
        process.terminate()  # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.wait(timeout=30) in (0, -15)
    rest = process.stderr.read()
    assert "Traceback" not in rest
    assert "pass costs (in 1-row passes): 1 rows 1.00" in rest, rest  # the server's own log lines are shown
