"""jobs/calibrate.py end to end on a tiny model: local Ray, resume after a kill, a worker killed mid-task,
`ray job submit` against a `ray start --head` cluster, and bad input refused before Ray starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest

from pipeline.search import SearchConfig, completed_trials, make_storage
from tests.conftest import REPO_ROOT
from tests.test_models import save_tiny

JOB = str(REPO_ROOT / "jobs" / "calibrate.py")
WORDS = {"low": range(3, 23), "high": range(100, 127)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model and a JSONL of two word-level domains, 8 prompts each."""
    root = tmp_path_factory.mktemp("calib")
    save_tiny(root / "model")
    rows = []
    for domain, words in WORDS.items():
        words = list(words)
        for i in range(8):
            rows.append({"domain": domain, "prompt": " ".join(f"t{words[(i * 5 + j) % len(words)]}" for j in range(10))})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def job_args(tiny, work, *extra):
    return ["--model", str(tiny / "model"), "--data", str(tiny / "data.jsonl"), "--no-chat", "--work-dir",
            str(work), "--prompts-per-trial", "2", "--max-new-tokens", "8", "--anchors-per-domain", "3",
            "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--no-final-demo", *extra]


def run_job(args, timeout=300, env=None):
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO_ROOT)


def studies(work: Path) -> dict[str, list]:
    storage = make_storage(str(work / "optuna-journal.log"))
    return {s.study_name: completed_trials(optuna.load_study(study_name=s.study_name, storage=storage))
            for s in optuna.get_all_study_summaries(storage)}


def test_local_run_publishes_a_bundle_and_prints_a_summary(tiny, tmp_path, capsys):
    proc = run_job(job_args(tiny, tmp_path / "w", "--trials", "3", "--bundle-name", "tiny"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "published as tiny@v1" in out and "predicted confirmed" in out
    assert "[low] trial 0:" in out + proc.stderr and "[high] trial 0:" in out + proc.stderr
    assert "own policy wins?" in out and "Predicted vs wall clock: median |error|" in out
    found = studies(tmp_path / "w")
    assert len(found) == 3 and all(len(trials) == 3 for trials in found.values())  # low, high and the mix
    assert any("-mix-" in name for name in found)
    assert (tmp_path / "w" / "embeddings.parquet").is_file()
    # the first trials are the seeds: prompt lookup first, then layer skipping; every kind leaves its policy
    kinds = {t.user_attrs["policy"]["kind"] for trials in found.values() for t in trials}
    assert {"prompt_lookup", "layer_skip"} <= kinds
    (bundle,) = (tmp_path / "w" / "bundles").iterdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["reference_policies"]) == {"mix"}
    assert [d["name"] for d in manifest["domains"]] == ["low", "high"]
    # each domain's store: one greedy output per calibration prompt, in the bundle and logged
    import pyarrow.parquet as pq

    data = pq.read_table(tmp_path / "w" / "data.parquet").to_pylist()
    assert [(s["domain"], s["arrays"]) for s in manifest["stores"]] == [
        (d, sum(r["domain"] == d and r["split"] == "calibration" for r in data)) for d in ("low", "high")]
    assert all(s["tokens"] > 0 for s in manifest["stores"]) and "store: [high]" in out
    for domain in manifest["domains"]:  # predicted and confirmed speedups, trials, and no mismatch on CPU fp32
        metrics = domain["metrics"]
        assert metrics["trials"] == 3 and metrics["predicted_speedup"] > 0 and metrics["confirmed_speedup"] > 0
        assert metrics["mismatch_rate"] == 0.0
        # confirmation says which candidate it kept and why, after at most --confirm-rounds rounds
        assert 1 <= metrics["confirm_rounds"] <= SearchConfig.confirm_rounds and metrics["confirmation"]
    assert "confirmation (the best predicted candidate is kept" in out
    validation = manifest["calibration"]["validation"]
    assert set(validation["domains"]) == {"low", "high"}
    assert all(set(row["speedups"]) == {"low", "high", "mix"} and row["mismatch_rate"] == 0.0
               for row in validation["domains"].values())
    assert isinstance(validation["domains"]["low"]["own_wins"], bool)
    assert len(manifest["calibration"]["step_costs"]["widths"]) >= 2
    # what the MLflow UI shows: the run named after the version, policies as params, provenance, a description
    from registry.mlflow_store import BundleRegistry

    registry = BundleRegistry(f"sqlite:///{tmp_path / 'w'}/mlflow.db")
    run = registry.client.get_run(registry.client.get_model_version("tiny", "1").run_id)
    assert run.data.tags["mlflow.runName"] == "tiny@v1" and "| low |" in run.data.tags["mlflow.note.content"]
    params = run.data.params
    assert params["policy.low.kind"] == json.dumps(manifest["domains"][0]["policy"]["kind"])
    assert len(params["data.fingerprint"]) == 16 and params["worker.device"] == "cpu"
    assert int(params["worker.torch_threads"]) >= 1 and params["version.torch"].startswith("2.")
    assert params["search.trials"] == "3" and manifest["calibration"]["provenance"]["data.fingerprint"] == \
        params["data.fingerprint"]
    assert "compare bundles in the MLflow UI: http://" in out
    metrics = run.data.metrics
    assert metrics["heldout_own_wins/low"] in (0.0, 1.0) and "heldout_speedup/high/mix" in metrics
    assert "Held-out check:" in run.data.tags["mlflow.note.content"]
    from knnssd.cli import main as knnssd_main

    uri = f"sqlite:///{tmp_path / 'w'}/mlflow.db"
    assert knnssd_main(["bundles", "show", "tiny@v1", "--tracking-uri", uri]) == 0
    shown = capsys.readouterr().out
    assert "predicted confirmed" in shown and "own policy wins?" in shown
    assert knnssd_main(["bundles", "show", "tiny@v1", "--tracking-uri", uri, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["calibration"]["validation"]["domains"]["high"]["speedups"].keys() == {"low", "high", "mix"}
    assert {"trials", "predicted_speedup", "confirmed_speedup"} <= set(as_json["domains"][0]["metrics"])


def kill_search_workers(work: Path) -> None:
    storage = make_storage(str(work / "optuna-journal.log"))
    for summary in optuna.get_all_study_summaries(storage):
        pid = optuna.load_study(study_name=summary.study_name, storage=storage).user_attrs.get("worker_pid.0")
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass


def test_killed_job_resumes_without_redoing_trials(tiny, tmp_path):
    work = tmp_path / "w"
    args = job_args(tiny, work, "--trials", "300", "--no-publish", "--domains", "low", "--no-mix")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first-run.log", "w")  # a file, not a pipe nobody reads: that would block the job
    proc = subprocess.Popen([sys.executable, JOB, *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO_ROOT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (work / "optuna-journal.log").exists():
                done = sum(len(t) for t in studies(work).values())
                if done >= 3:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("no trials finished in time: " + (tmp_path / "first-run.log").read_text()[-2000:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
        log.close()
        kill_search_workers(work)  # Ray workers live in their own sessions
    (study_name, before), = studies(work).items()
    assert 3 <= len(before) < 300
    kept = {t.number: t.params for t in before}
    rerun = run_job(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    status = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "trials completed" in line]
    assert status and f": {len(before)} of 300 trials completed" in status[0], status
    after = studies(work)[study_name]
    assert len(after) == 300
    assert {t.number: t.params for t in after if t.number in kept} == kept  # finished trials kept as they were


def test_worker_killed_mid_search_is_retried(tiny, tmp_path):
    import ray

    from pipeline.calibrate import CalibrationConfig, identify, run_searches
    from pipeline.data import DataConfig, load_calibration_table
    from pipeline.tasks import ModelSpec

    work = tmp_path / "w"
    config = CalibrationConfig(model=ModelSpec(name=str(tiny / "model"), chat=False), bundle_name="t",
                               data=DataConfig(path=str(tiny / "data.jsonl"), domains=("high",)),
                               search=SearchConfig(trials=200, prompts_per_trial=2, max_new_tokens=8,
                                                   confirm_prompts=2),
                               work_dir=str(work), mix=False)
    table = load_calibration_table(config.data, min_calibration=2)
    ray.init(num_cpus=2, include_dashboard=False)
    killed = []

    def kill_worker_once_trials_exist():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if (work / "optuna-journal.log").exists():
                storage = make_storage(config.storage_url)
                for summary in optuna.get_all_study_summaries(storage):
                    study = optuna.load_study(study_name=summary.study_name, storage=storage)
                    if len(completed_trials(study)) >= 2 and "worker_pid.0" in study.user_attrs:
                        os.kill(study.user_attrs["worker_pid.0"], signal.SIGKILL)
                        killed.append(study.user_attrs["worker_pid.0"])
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_worker_once_trials_exist)
    killer.start()
    try:
        results = run_searches(config, table, identify(config, print), log=print)
    finally:
        killer.join()
        ray.shutdown()
    assert killed, "the worker was never killed"
    (result,) = results
    assert result["domain"] == "high" and result["metrics"]["trials"] == 200
    storage = make_storage(config.storage_url)
    study = optuna.load_study(study_name=result["study"], storage=storage)
    assert study.user_attrs["worker_pid.0"] != killed[0]  # the retry ran in another worker
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert len(numbers) == len(set(numbers))


def test_ray_job_submit_against_a_head_node(tiny, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    address = os.environ.get("KNNSSD_TEST_RAY_ADDRESS")
    started = False
    ray_bin = str(Path(sys.executable).with_name("ray"))
    if not address:
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--include-dashboard", "true",
                        "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", temp_dir],
                       check=True, capture_output=True, env=env, timeout=120)
        address, started = "http://127.0.0.1:8265", True
    try:
        work = tmp_path / "w"
        proc = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT), "--",
             sys.executable, "jobs/calibrate.py", *job_args(tiny, work, "--trials", "2", "--bundle-name", "sub")],
            capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "succeeded" in proc.stdout and "published as sub@v1" in proc.stdout
        # the evaluation of that bundle, submitted the same way: its measurement runs as a Ray task
        proc = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT), "--",
             sys.executable, "jobs/evaluate.py", "--bundle", "sub@v1", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
             "--max-new-tokens", "6", "--prompts-per-domain", "1", "--streams", "task", "--peers", "hf-prompt-lookup",
             "--out", str(work / "eval")],
            capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "succeeded" in proc.stdout and "logged to MLflow run" in proc.stdout
        assert "task stream, overall (" in proc.stdout and (work / "eval" / "speedup.png").is_file()
    finally:
        if started:
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize("extra, words", [
    (["--trials", "0"], "--trials must be >= 1"),
    (["--model", "/nonexistent/model"], "does not exist or holds no config.json"),
    (["--data", "/nonexistent.jsonl"], "data file /nonexistent.jsonl does not exist"),
    (["--columns", "domain=topic"], "has no column 'topic'"),
    (["--bundle-name", "bad name!"], "malformed bundle reference"),
    (["--store-tokens", "0"], "--store-tokens and --store-batch must be >= 1"),
])
def test_bad_input_fails_before_ray_starts(tiny, tmp_path, extra, words):
    args = job_args(tiny, tmp_path / "w", "--trials", "2")
    for flag in ("--model", "--data", "--prompts-per-trial"):
        if flag in extra and flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    start = time.monotonic()
    proc = run_job([*args, *extra], timeout=120)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "optuna-journal.log").exists()
    assert time.monotonic() - start < 60
