"""A policy search over a tiny model searches recycled successors: trials with recycled_nodes > 0 are suggested,
replayed on the workload's traces (which carry the successors) and scored."""

from __future__ import annotations

import optuna
import torch

from pipeline.scoring import build_workload, score_policy
from pipeline.search import completed_trials, make_objective, open_study, prepare_study, run_worker
from pipeline.space import RECYCLED_NODES, SearchConfig
from tests.conftest import tiny_model
from tests.test_replay import branching_prompt, costs


def test_a_search_suggests_and_scores_recycled_successors(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = tiny_model("llama")
    config = SearchConfig(trials=12, prompts_per_trial=2, max_new_tokens=16, confirm_prompts=2,
                          kinds=("suffix_tree",), sampler="random")
    prompts = [branching_prompt(1), torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))]
    workload = build_workload(model, prompts, config.max_new_tokens)
    table = costs()
    storage = str(tmp_path / "journal.log")
    prepare_study(storage, "recycled", num_layers=4, config=config)
    study = open_study(storage, "recycled", config)
    run_worker(study, make_objective(model, 4, workload, table, config, lambda message: None), config)
    trials = completed_trials(study)
    assert len(trials) == config.trials
    recycling = [t for t in trials if t.user_attrs["policy"]["recycled_nodes"] > 0]
    assert recycling and {t.user_attrs["policy"]["recycled_nodes"] for t in trials} <= set(RECYCLED_NODES)
    changed = 0
    for trial in recycling:
        policy = trial.user_attrs["policy"]
        assert trial.value == score_policy(model, policy, 4, workload, table).predicted_speedup
        changed += trial.value != score_policy(model, {**policy, "recycled_nodes": 0}, 4, workload,
                                               table).predicted_speedup
    assert changed > 0  # the recycled nodes reached the replayed trees, hence the score
