"""Real services for tests: an MLflow tracking server with its registry.

.ci/run starts one and exports KNNSSD_TEST_MLFLOW_URI; without it, the fixture starts its own and stops it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(uri: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"MLflow server at {uri} not healthy after {timeout} s")


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, sqlite store and artifacts under `folder`; (process, uri)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    process = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri)
    except RuntimeError:
        process.kill()
        raise
    return process, uri


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def external_mlflow_uri() -> str | None:
    return os.environ.get("KNNSSD_TEST_MLFLOW_URI") or None


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """An MLflow tracking server: .ci/run's (KNNSSD_TEST_MLFLOW_URI), else one started for the module."""
    uri = external_mlflow_uri()
    if uri:
        yield uri
        return
    process, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop(process)
