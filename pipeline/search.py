"""Per-domain draft-policy search: one Optuna study per (model, domain), every trial a priced replay.

What a trial searches, and the settings, are in `pipeline.space`. A trial's value is its predicted speedup
(`pipeline.scoring`): its events replayed over the prompts' plain greedy continuations (`pipeline.replay`) and
priced by the node's step costs (`pipeline.costs`), deterministic and cheap: a few ms per prompt for lookup
and suffix trees; one forward of the skipping model per prompt the first time a study scores a skip set, from
its first skipped layer on, and none for that skip set again (`pipeline.scoring.Predictions`), where decoding
it would take seconds and time it with noise larger than the differences between policies. Wall
clock is consulted later: the top `confirm_candidates` distinct policies are re-measured on `confirm_prompts`
prompts (`pipeline.confirm`) before one is chosen.

Each trial's policy (the JSON a bundle stores) and figures are kept on the trial (user attributes). Studies live
in storage (a journal file by default, or an RDB URL), so a search that is killed and run again resumes:
finished trials are kept, and only the rest are run. Several workers may run one study at once (`workers`): the
driver prepares it first (seeds, interrupted trials), each worker stops once the study holds `trials` completed
trials (Optuna's `MaxTrialsCallback`), and TPE runs with `constant_liar` so workers do not sample alike.

A domain with a store (`pipeline.stores.DomainStore`) searches whether its suffix-tree policies draft from it;
the study's name then includes the store's fingerprint, so a run with another store (or none) never resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import optuna
from optuna.study import MaxTrialsCallback

from knnssd.engine.policy import describe_policy
from pipeline.costs import StepCosts
from pipeline.drafting import PolicyDrafters
from pipeline.scoring import Workload, score_policy
from pipeline.stores import DomainStore
from pipeline.space import SearchConfig, kind_quota, policy_skip_ratio, seed_trials, suggest_policy

ATTEMPTS_PER_TRIAL = 5  # a worker gives up after this many attempts per completed trial (skip-ratio prunes)


def make_storage(storage: str) -> Any:
    """An Optuna storage: an RDB URL as is, else a journal file at that path."""
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.dirname(os.path.abspath(storage)), exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def prompts_fingerprint(prompts: list[str]) -> str:
    """8 hex digits of sha256 over the study's calibration prompts, in order."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:8]


def store_fingerprint(store: DomainStore) -> str:
    """8 hex digits of sha256 over a store's prompts and outputs, and its successors and vocabulary where it has
    them (a study whose trials may start from the warm table scores differently with another table, and
    suggests use_warm only with one), and its union's prompts and outputs where it carries a union of more than
    its own data (`has_union`: the study then searches store_scope, and its union trials score on that union)."""
    parts = [store.prompts, store.outputs] + ([store.successors, store.vocab] if store.successors is not None else [])
    if store.has_union:
        parts += ["union", store.union_store.prompts, store.union_store.outputs]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]


def study_name(model_hash: str, domain: str, config: SearchConfig, prompts: list[str],
               store: DomainStore | None = None) -> str:
    """A study's identity: model, domain, measurement settings, the prompts it calibrates on and the store its
    suffix trees may draft from, so a run on other data (the same domain names, the same work dir) never resumes
    a study measured on other prompts or another store (whose trials would score differently, and whose
    parameters differ: use_store exists only with a store)."""
    name = f"knnssd-{model_hash[:12]}-{domain}-{config.fingerprint()}-{prompts_fingerprint(prompts)}"
    return name + (f"-store{store_fingerprint(store)}" if store is not None else "")


def open_study(storage: str, name: str, config: SearchConfig) -> optuna.Study:
    """The study `name` in `storage`, created if new, as worker 0 sees it."""
    return open_worker_study(storage, name, config, worker=0)


def open_worker_study(storage: str, name: str, config: SearchConfig, worker: int) -> optuna.Study:
    """The study as worker `worker` opens it: its sampler seeded by `config.seed` and the worker index, so
    parallel workers do not propose the same trials (TPE also lies about running trials: `constant_liar`)."""
    seed = config.seed + 1000 * worker
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, config.trials // 3)),
                                          constant_liar=config.workers > 1)
               if config.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    return optuna.create_study(study_name=name, storage=make_storage(storage), sampler=sampler,
                               direction="maximize", load_if_exists=True)


def fail_stale_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed worker are marked FAIL so they neither count nor block.

    Only safe while no worker runs the study: the driver calls it before it starts the study's workers (and a
    retried worker does not), so every RUNNING trial it sees belongs to a worker that died."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def prepare_study(storage: str, name: str, num_layers: int, config: SearchConfig,
                  has_store: bool = False) -> tuple[int, int]:
    """Before any worker runs: mark interrupted trials failed and enqueue the seeds of a new study.
    Returns (completed trials, interrupted trials)."""
    study = open_study(storage, name, config)
    stale = fail_stale_trials(study)
    enqueue_seeds(study, num_layers, config, has_store)
    return len(completed_trials(study)), stale


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], float], config: SearchConfig) -> int:
    """Run trials until the study holds `config.trials` completed ones (counting every worker's). Returns the
    trials this worker ran."""
    ran = 0

    def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal ran
        ran += 1

    missing = config.trials - len(completed_trials(study))
    if missing > 0:
        study.optimize(objective, n_trials=ATTEMPTS_PER_TRIAL * missing, catch=(),
                       callbacks=[count, MaxTrialsCallback(config.trials, states=(optuna.trial.TrialState.COMPLETE,))])
    return ran


def enqueue_seeds(study: optuna.Study, num_layers: int, config: SearchConfig, has_store: bool = False) -> None:
    """The seeds, then the kind quota, as the first trials of a new study (a resumed one has them already)."""
    if study.get_trials(deepcopy=False):
        return
    first = seed_trials(num_layers, config, has_store) + kind_quota(num_layers, config, has_store)
    for params in first[: max(0, config.trials - 1)]:
        study.enqueue_trial(params)


def make_objective(model: Any, num_layers: int, workload: Workload, costs: StepCosts, config: SearchConfig,
                   progress: Callable[[str], None],
                   store: DomainStore | None = None) -> Callable[[optuna.Trial], float]:
    """The trial objective on `workload`; `store`: the domain's store (suffix trees may then draft from it, each
    prompt from the store without its own output: the workload carries the prompts' texts)."""
    drafters = PolicyDrafters(num_layers)  # the worker's indexed stores, reused across trials

    def objective(trial: optuna.Trial) -> float:
        policy = suggest_policy(trial, num_layers, config, has_store=store is not None,
                                has_warm=store is not None and store.successors is not None,
                                has_union=store is not None and store.has_union)
        ratio = policy_skip_ratio(policy, num_layers)
        trial.set_user_attr("policy", policy)
        trial.set_user_attr("skip_ratio", ratio or 0.0)
        if ratio is not None and not config.min_skip_ratio <= ratio <= config.max_skip_ratio:
            raise optuna.TrialPruned()
        score = score_policy(model, policy, num_layers, workload, costs, store, drafters)
        trial.set_user_attr("prompts", len(workload.traces))  # every prompt of the workload was scored
        for key, value in score.to_dict().items():
            trial.set_user_attr(key, value)
        if trial.number % 10 == 0 or score.predicted_speedup > best_so_far(trial.study):
            progress(f"trial {trial.number}: {describe_policy(policy)}: predicted {score.predicted_speedup:.3f}, "
                     f"mean accepted {score.mean_accepted_tokens:.2f} "
                     f"({len(completed_trials(trial.study))} completed)")
        return score.predicted_speedup

    return objective


def best_so_far(study: optuna.Study) -> float:
    values = [t.value for t in completed_trials(study) if t.value is not None]
    return max(values, default=float("-inf"))
