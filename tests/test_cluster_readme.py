"""The README's "calibrate on a cluster" path, as written: `ray job submit --working-dir .` with the venv's
python by absolute path and absolute paths for everything the job reads or writes, against the Ray head and the
MLflow server that .ci/run starts (KNNSSD_TEST_RAY_ADDRESS, KNNSSD_TEST_MLFLOW_URI; skipped without them).

Checked: a relative --data is refused inside the job with the flag's absolute form; a job stopped with
`ray job stop` after a finished stage, submitted again with the same --work-dir, does not redo that stage
and publishes to the tracking server; the bundle loads from a separate process (`knnssd bundles show`). Without
a cluster: what `check_job_paths` refuses in a job driver (the environment Ray's job supervisor gives it), and a
python without the project's packages refused before any import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from knnssd.errors import KnnSsdError
from pipeline.cluster import JOB_CONFIG_ENV, check_job_paths
from tests.conftest import REPO_ROOT
from tests.test_calibrate_job import tiny  # noqa: F401  (the module fixture: a tiny model and two domains)

RAY_ADDRESS = os.environ.get("KNNSSD_TEST_RAY_ADDRESS")
MLFLOW_URI = os.environ.get("KNNSSD_TEST_MLFLOW_URI")
BIN = Path(sys.executable).parent  # the venv's bin: what "$PWD/.venv/bin" is in the README's commands
JOB_ENV = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"},
                      "metadata": {"job_submission_id": "raysubmit_test"}})  # what Ray 2.60 sets for a driver
GCS_PACKAGE_RACE = "Failed to download runtime_env file package"  # ray-project/ray#46625, #36703


# ---- without a cluster: the checks a job driver runs before any work -------------------------------------------

@pytest.fixture
def in_job(monkeypatch, tmp_path):
    """This process as a `ray job submit` driver: Ray's job environment variable set, cwd a fresh folder."""
    monkeypatch.setenv(JOB_CONFIG_ENV, JOB_ENV)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refusal(argv: list[str], capsys) -> str:
    from jobs.calibrate import main

    assert main([*argv, "--model", "/nonexistent/model"]) == 2  # were nothing refused: a quick error, not a run
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(fix: " in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, words", [
    ([], ['--work-dir calibration is relative', '--work-dir "$PWD/calibration"']),
    (["--work-dir", "/abs/w"], ["no --tracking-uri and no $MLFLOW_TRACKING_URI", "--tracking-uri http://"]),
    (["--work-dir", "/abs/w", "--tracking-uri", "sqlite:///mlflow.db"],
     ["--tracking-uri sqlite:///mlflow.db is a relative file store", "--tracking-uri http://"]),
    (["--work-dir", "/abs/w", "--tracking-uri", "http://127.0.0.1:5000", "--storage", "sqlite:///optuna.db"],
     ["--storage sqlite:///optuna.db is relative", '--storage "sqlite:///$PWD/optuna.db"']),
    (["--data", "../data/question.jsonl", "--work-dir", "/abs/w"],
     ["--data ../data/question.jsonl does not exist in this Ray job's working directory, Ray's throwaway copy",
      '--data "$PWD/../data/question.jsonl"']),
    (["--signing-key", "keys/me.key", "--work-dir", "/abs/w", "--tracking-uri", "http://127.0.0.1:5000"],
     ['--signing-key "$PWD/keys/me.key"']),
])
def test_paths_into_the_job_copy_are_refused(in_job, capsys, argv, words):
    err = refusal(argv, capsys)
    assert all(w in err for w in words), err
    assert not (in_job / "calibration").exists()


def test_what_a_job_may_use(in_job, monkeypatch):
    (in_job / "data.jsonl").write_text("{}")  # a relative input that the uploaded folder holds is read there
    check_job_paths({"--data": "data.jsonl"}, {"--work-dir": "/abs/w", "--storage": "postgresql://h/db"},
                    ("--tracking-uri", "sqlite:////abs/mlflow.db"))
    check_job_paths({}, {"--work-dir": "/abs/w"}, None)  # publishing nothing: no tracking store needed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_job_paths({}, {"--work-dir": "/abs/w"}, ("--tracking-uri", None))
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))  # no --working-dir: the head's folder
    check_job_paths({"--data": "data.jsonl"}, {"--work-dir": "calibration"}, ("--tracking-uri", "sqlite:///m.db"))
    with pytest.raises(KnnSsdError, match="--data missing.jsonl does not exist in this Ray job's working "
                                          "directory, the folder the Ray head was started in"):
        check_job_paths({"--data": "missing.jsonl"}, {}, None)
    monkeypatch.delenv(JOB_CONFIG_ENV)  # outside a job: relative paths are the user's own folder
    check_job_paths({"--data": "missing.jsonl"}, {"--work-dir": "calibration"}, ("--tracking-uri", None))


def test_a_python_without_the_project_is_refused(tmp_path):
    """What a bare `python` on the head node's PATH gives: one error line naming the venv's python."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-c", "import importlib.util as u; print(u.find_spec('ray') is None)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip(f"{base} (the venv's base python) has Ray installed: no python without the project here")
    proc = subprocess.run([str(base), str(REPO_ROOT / "jobs" / "calibrate.py"), "--smoke"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {base} has no ") and '"$PWD/.venv/bin/python" jobs/calibrate.py' \
        in proc.stderr


# ---- the README's commands against .ci/run's Ray head and MLflow server ----------------------------------------

needs_cluster = pytest.mark.skipif(
    not (RAY_ADDRESS and MLFLOW_URI),
    reason="KNNSSD_TEST_RAY_ADDRESS and KNNSSD_TEST_MLFLOW_URI are not set: .ci/run starts a Ray head and an "
           "MLflow server and sets them (or start both as the README's cluster section says)")


def cli_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=REPO_ROOT)


def submit(job_args: list[str], *submit_args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    """The README's command, from the repository: ray job submit --address A --working-dir . -- "$PWD/.venv/bin/
    python" jobs/calibrate.py ARGS. Submitted once more if Ray lost the uploaded folder of an unchanged working dir
    (a known Ray race, not this project's: the job never started)."""
    command = ["job", "submit", "--address", RAY_ADDRESS, "--working-dir", ".", *submit_args, "--",
               sys.executable, "jobs/calibrate.py", *job_args]
    proc = ray_cli(*command, timeout=timeout)
    if GCS_PACKAGE_RACE in proc.stdout + proc.stderr:
        time.sleep(2)
        proc = ray_cli(*command, timeout=timeout)
    return proc


def job_status(job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(RAY_ADDRESS).get_job_status(job_id).value)


@needs_cluster
def test_readme_cluster_commands(tiny, tmp_path):  # noqa: F811
    work = tmp_path / "calibration"
    name = f"cluster-readme-{uuid.uuid4().hex[:8]}"
    data = tiny / "data.jsonl"
    common = ["--model", str(tiny / "model"), "--no-chat", "--prompts-per-trial", "2", "--max-new-tokens", "8",
              "--anchors-per-domain", "3", "--trials", "2", "--no-mix", "--no-final-demo", "--bundle-name", name,
              "--tracking-uri", MLFLOW_URI, "--work-dir", str(work)]

    # a relative --data, as the README used to give it: refused in the job with the absolute form to pass
    relative = os.path.relpath(data, REPO_ROOT)
    proc = submit([*common, "--data", relative], timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"error: --data {relative} does not exist in this Ray job's working directory" \
        in out and f'--data "$PWD/{relative}"' in out and "Traceback" not in out, out[-3000:]
    assert not work.exists()

    # the job, stopped with `ray job stop` once its first stage (this node's step costs) is in the work dir
    job_id = f"calibrate-{uuid.uuid4().hex[:8]}"
    args = [*common, "--data", str(data)]
    proc = submit(args, "--no-wait", "--submission-id", job_id, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    deadline = time.monotonic() + 300
    costs = []
    while time.monotonic() < deadline and not costs:
        costs = list((work / "step-costs").glob("*.json"))
        if not costs and job_status(job_id) in ("FAILED", "SUCCEEDED", "STOPPED"):
            pytest.fail(ray_cli("job", "logs", "--address", RAY_ADDRESS, job_id).stdout[-3000:])
        time.sleep(0.5)
    stopped = ray_cli("job", "stop", "--address", RAY_ADDRESS, job_id)
    assert costs, "no stage finished in time: " + ray_cli("job", "logs", "--address", RAY_ADDRESS, job_id).stdout
    assert stopped.returncode == 0 and job_status(job_id) == "STOPPED", stopped.stdout + stopped.stderr
    (table,) = costs
    timed = (table.stat().st_mtime_ns, table.read_text())

    # submitted again with the same --work-dir: the finished stage is read, not redone, and the bundle published
    proc = submit(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in proc.stdout, out[-3000:]
    assert f"published as {name}@v1" in out and f"in {MLFLOW_URI}" in out
    assert "model: hash" in out and "step costs timed" not in out
    assert (table.stat().st_mtime_ns, table.read_text()) == timed
    assert [p.name for p in (work / "bundles").iterdir()] and (work / "optuna-journal.log").is_file()

    # the bundle, from another shell (another process and folder) through the tracking server
    shown = subprocess.run([str(BIN / "knnssd"), "bundles", "show", f"{name}@v1", "--tracking-uri", MLFLOW_URI],
                           capture_output=True, text=True, cwd=tmp_path, timeout=180,
                           env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "predicted confirmed" in shown.stdout and "low" in shown.stdout and "high" in shown.stdout
