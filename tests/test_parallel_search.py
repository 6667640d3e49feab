"""One domain's study run by several Ray workers at once, on a multi-node cluster simulated on this machine
(`ray.cluster_utils.Cluster`): no trial duplicated or lost, and the study still resumes."""

from __future__ import annotations

import optuna
import pytest

from pipeline.search import SearchConfig, completed_trials, make_storage
from tests.test_calibrate_job import tiny  # noqa: F401 - the saved tiny model and its data


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_share_one_study_without_duplicated_or_lost_trials(tiny, tmp_path, cluster):  # noqa: F811
    import ray

    from pipeline.calibrate import CalibrationConfig, identify, run_searches
    from pipeline.data import DataConfig, load_calibration_table
    from pipeline.tasks import ModelSpec

    def config(trials: int) -> CalibrationConfig:
        return CalibrationConfig(
            model=ModelSpec(name=str(tiny / "model"), chat=False, threads=1), bundle_name="t",
            data=DataConfig(path=str(tiny / "data.jsonl"), domains=("low",)),
            search=SearchConfig(trials=trials, prompts_per_trial=2, max_new_tokens=8, confirm_prompts=2, workers=2),
            work_dir=str(tmp_path / "w"), mix=False)

    first = config(30)
    table = load_calibration_table(first.data, min_calibration=2)
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")}
    assert len(nodes) == 2
    model = identify(first, print)
    (result,) = run_searches(first, table, model, print)
    storage = make_storage(first.storage_url)
    study = optuna.load_study(study_name=result["study"], storage=storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # none duplicated, none missing
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)]
    completed = completed_trials(study)
    assert 30 <= len(completed) <= 31  # each worker stops at the budget; both may finish one trial at once
    assert {"worker_pid.0", "worker_pid.1"} <= set(study.user_attrs)
    assert study.user_attrs["worker_pid.0"] != study.user_attrs["worker_pid.1"]  # two processes ran it
    assert result["metrics"]["trials"] == len(completed)

    kept = {t.number: (t.params, t.value) for t in completed}
    (again,) = run_searches(config(45), table, model, print)  # a bigger budget resumes the same study
    assert again["study"] == result["study"]
    study = optuna.load_study(study_name=result["study"], storage=storage)
    after = completed_trials(study)
    assert 45 <= len(after) <= 46
    assert {t.number: (t.params, t.value) for t in after if t.number in kept} == kept
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert len(numbers) == len(set(numbers))
