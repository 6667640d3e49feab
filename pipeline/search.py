"""Per-domain draft-policy search: one Optuna study per (model, domain), every trial a priced replay.

A trial first picks the drafter kind among `SearchConfig.kinds`, then that kind's parameters (conditional
parameters, which TPE handles):
  layer_skip     the 2L binary choices "skip attention / MLP of layer i", the confidence threshold, and the
                 maximum draft length;
  prompt_lookup  the largest and smallest n-gram sizes, and the maximum draft length;
  hybrid         both sets above (lookup where the text matches, layer skipping elsewhere).
Trials whose skip ratio falls outside [min_skip_ratio, max_skip_ratio] are pruned before any work. A trial's
value is its predicted speedup (`pipeline.scoring`): its events replayed over the prompts' plain greedy
continuations (`pipeline.replay`) and priced by the worker's step costs (`pipeline.costs`), deterministic and
about a tenth of a second per prompt, where decoding it would take seconds and time it with noise larger than
the differences between policies. Wall clock decides later: the top `confirm_candidates` distinct policies are
re-measured on `confirm_prompts` prompts (`pipeline.measure`) before one is chosen.

Each trial's policy (the JSON a bundle stores) and figures are kept on the trial (user attributes). Studies live
in storage (a journal file by default, or an RDB URL), so a search that is killed and run again resumes:
finished trials are kept, and only the rest are run. Several workers may run one study at once (`workers`): the
driver prepares it first (seeds, interrupted trials), each worker stops once the study holds `trials` completed
trials (Optuna's `MaxTrialsCallback`), and TPE runs with `constant_liar` so workers do not sample alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import optuna
from optuna.study import MaxTrialsCallback

from knnssd.drafters import LayerSkipConfig, PromptLookupConfig
from knnssd.errors import KnnSsdError
from knnssd.policy import describe_policy
from knnssd.skipset import SkipSet
from pipeline.costs import StepCosts
from pipeline.scoring import Workload, score_policy

# Bumped whenever the objective's measurement or search space changes, so a resumed study never mixes
# incomparable trials.
MEASUREMENT_VERSION = 5
ATTEMPTS_PER_TRIAL = 5  # a worker gives up after this many attempts per completed trial (skip-ratio prunes)
SEARCHABLE_KINDS = ("layer_skip", "prompt_lookup", "hybrid")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LAYER_SKIP_DRAFT_RANGE = (2, 12)  # max_draft_tokens searched for layer skipping
LOOKUP_DRAFT_RANGE = (2, 15)  # max_draft_tokens searched for prompt lookup (widths up to 16: the fast kernels)
NGRAM_RANGE = (1, 4)  # max_ngram
MIN_NGRAM_RANGE = (1, 2)  # min_ngram (at most max_ngram)


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 100
    prompts_per_trial: int = 4
    max_new_tokens: int = 32
    sampler: str = "tpe"
    seed: int = 0
    min_skip_ratio: float = 0.01
    max_skip_ratio: float = 0.5
    min_speedup: float = 1.0
    confirm_candidates: int = 3
    confirm_prompts: int = 8
    workers: int = 1
    kind_share: float = 0.15
    kinds: tuple[str, ...] = SEARCHABLE_KINDS
    seed_layer_skip: LayerSkipConfig = LayerSkipConfig()
    seed_lookup: PromptLookupConfig = PromptLookupConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [kind for kind in self.kinds if kind not in SEARCHABLE_KINDS]
        if unknown or not self.kinds:
            raise KnnSsdError(f"unknown or no drafter kinds to search: {', '.join(unknown) or '(none)'}",
                              fix=f"choose from {','.join(SEARCHABLE_KINDS)}, e.g. --policies layer_skip,prompt_lookup")
        if self.trials < 1:
            raise KnnSsdError(f"--trials must be >= 1, got {self.trials}", fix="run at least one trial per domain")
        if self.prompts_per_trial < 1:
            raise KnnSsdError("--prompts-per-trial must be >= 1", fix="use e.g. 4")
        if self.max_new_tokens < 2:
            raise KnnSsdError("--max-new-tokens must be >= 2 (one token leaves nothing to draft)", fix="use e.g. 32")
        if self.confirm_candidates < 1:
            raise KnnSsdError("--confirm-candidates must be >= 1", fix="use e.g. 3")
        if self.confirm_prompts < self.prompts_per_trial:
            raise KnnSsdError(f"--confirm-prompts ({self.confirm_prompts}) must be >= --prompts-per-trial "
                              f"({self.prompts_per_trial}): candidates are confirmed on more prompts than searched",
                              fix=f"use e.g. --confirm-prompts {2 * self.prompts_per_trial}")
        if self.workers < 1:
            raise KnnSsdError("--workers-per-domain must be >= 1", fix="use 1, or the GPUs per domain")
        if not 0.0 <= self.kind_share * len(self.kinds) <= 1.0:
            raise KnnSsdError(f"--kind-share {self.kind_share} must be in [0, 1 / {len(self.kinds)} kinds]: each kind's "
                              "guaranteed share of the budget",
                              fix=f"use at most {1 / len(self.kinds):.2f}, e.g. 0.15")
        if self.sampler not in ("tpe", "random"):
            raise KnnSsdError(f"unknown sampler {self.sampler!r}", fix="use tpe or random")
        if not 0.0 <= self.min_skip_ratio <= self.max_skip_ratio < 1.0:
            raise KnnSsdError("need 0 <= min_skip_ratio <= max_skip_ratio < 1", fix="e.g. 0.01 and 0.5")
        if self.seed_layer_skip.threshold not in THRESHOLDS:
            raise KnnSsdError(f"the seed threshold {self.seed_layer_skip.threshold} is not on the search grid",
                              fix=f"choose one of {', '.join(map(str, THRESHOLDS))}")
        for name, value, (low, high) in (
                ("layer-skip max_draft_tokens", self.seed_layer_skip.max_draft_tokens, LAYER_SKIP_DRAFT_RANGE),
                ("prompt-lookup max_draft_tokens", self.seed_lookup.max_draft_tokens, LOOKUP_DRAFT_RANGE),
                ("prompt-lookup max_ngram", self.seed_lookup.max_ngram, NGRAM_RANGE),
                ("prompt-lookup min_ngram", self.seed_lookup.min_ngram, MIN_NGRAM_RANGE)):
            if not low <= value <= high:
                raise KnnSsdError(f"the seed {name} {value} is outside the searched range {low}..{high}",
                                  fix=f"choose a value in {low}..{high}")

    def fingerprint(self) -> str:
        """What makes trials comparable: measurement settings and method (not the budget, the confirmation or
        the workers)."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("trials", "confirm_candidates", "confirm_prompts", "workers", "min_speedup",
                             "kind_share")}
        keys["measurement"] = MEASUREMENT_VERSION
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]


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


def study_name(model_hash: str, domain: str, config: SearchConfig, prompts: list[str]) -> str:
    """A study's identity: model, domain, measurement settings and the prompts it calibrates on, so a run on
    other data (the same domain names, the same work dir) never resumes a study measured on other prompts."""
    return f"knnssd-{model_hash[:12]}-{domain}-{config.fingerprint()}-{prompts_fingerprint(prompts)}"


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


def prepare_study(storage: str, name: str, num_layers: int, config: SearchConfig) -> tuple[int, int]:
    """Before any worker runs: mark interrupted trials failed and enqueue the seeds of a new study.
    Returns (completed trials, interrupted trials)."""
    study = open_study(storage, name, config)
    stale = fail_stale_trials(study)
    enqueue_seeds(study, num_layers, config)
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


def seed_skip_sets(num_layers: int, config: SearchConfig) -> list[SkipSet]:
    """Attention of the top 1, 2, 4 and 8 layers below the last (published skip sets skip attention more often
    than MLP, mostly in upper layers), within the skip-ratio bounds. Random starts over 2L coin flips skip
    about half of all sub-layers, which few models survive."""
    seeds = []
    for k in (1, 2, 4, 8):
        if k < num_layers:
            skip = SkipSet.of(attn=range(num_layers - 1 - k, num_layers - 1))
            if config.min_skip_ratio <= skip.skip_ratio(num_layers) <= config.max_skip_ratio:
                seeds.append(skip)
    return seeds


def skip_params(skip: SkipSet, num_layers: int) -> dict[str, Any]:
    params: dict[str, Any] = {f"attn_{i}": i in skip.attn for i in range(num_layers)}
    params.update({f"mlp_{i}": i in skip.mlp for i in range(num_layers)})
    return params


def seed_trials(num_layers: int, config: SearchConfig) -> list[dict[str, Any]]:
    """First trials of a new study, one per kind before the rest: prompt lookup with the configured n-gram
    size and draft length, then the layer-skip seed sets, then a hybrid of the two, as far as `kinds` allow."""
    lookup = {"prompt_lookup.max_ngram": config.seed_lookup.max_ngram,
              "prompt_lookup.min_ngram": config.seed_lookup.min_ngram,
              "prompt_lookup.max_draft_tokens": config.seed_lookup.max_draft_tokens}
    layer = {"layer_skip.threshold": config.seed_layer_skip.threshold,
             "layer_skip.max_draft_tokens": config.seed_layer_skip.max_draft_tokens}
    skips = seed_skip_sets(num_layers, config)
    seeds: list[dict[str, Any]] = []
    if "prompt_lookup" in config.kinds:
        seeds.append({"kind": "prompt_lookup", **lookup})
    if "layer_skip" in config.kinds:
        seeds.extend({"kind": "layer_skip", **layer, **skip_params(skip, num_layers)} for skip in skips)
    if "hybrid" in config.kinds and skips:
        seeds.append({"kind": "hybrid", **lookup, **layer, **skip_params(skips[0], num_layers)})
    return seeds


def kind_quota(num_layers: int, config: SearchConfig) -> list[dict[str, Any]]:
    """After the seeds, trials with only their kind fixed (the sampler picks the rest), round-robin over the
    kinds, until each kind has `kind_share` of the budget: TPE otherwise learns early that one kind scores best
    and spends nearly every trial on it (88 of 100 on prompt lookup in BENCHMARKS.md section 13), leaving the
    others barely searched."""
    seeds = seed_trials(num_layers, config)
    wanted = {kind: max(0, math.ceil(config.kind_share * config.trials)
                        - sum(seed["kind"] == kind for seed in seeds)) for kind in config.kinds}
    quota = []
    while any(wanted.values()):
        for kind in config.kinds:
            if wanted[kind]:
                quota.append({"kind": kind})
                wanted[kind] -= 1
    return quota


def enqueue_seeds(study: optuna.Study, num_layers: int, config: SearchConfig) -> None:
    """The seeds, then the kind quota, as the first trials of a new study (a resumed one has them already)."""
    if study.get_trials(deepcopy=False):
        return
    for params in (seed_trials(num_layers, config) + kind_quota(num_layers, config))[: max(0, config.trials - 1)]:
        study.enqueue_trial(params)


def suggest_skip_set(trial: optuna.Trial, num_layers: int) -> SkipSet:
    attn = [i for i in range(num_layers) if trial.suggest_categorical(f"attn_{i}", [False, True])]
    mlp = [i for i in range(num_layers) if trial.suggest_categorical(f"mlp_{i}", [False, True])]
    return SkipSet.of(attn=attn, mlp=mlp)


def suggest_policy(trial: optuna.Trial, num_layers: int, config: SearchConfig) -> dict[str, Any]:
    """A draft policy (bundle JSON form) from the trial's parameters."""
    kind = trial.suggest_categorical("kind", list(config.kinds))
    parts: dict[str, dict[str, Any]] = {}
    if kind in ("prompt_lookup", "hybrid"):
        max_ngram = trial.suggest_int("prompt_lookup.max_ngram", *NGRAM_RANGE)
        parts["prompt_lookup"] = {
            "max_ngram": max_ngram,
            "min_ngram": min(max_ngram, trial.suggest_int("prompt_lookup.min_ngram", *MIN_NGRAM_RANGE)),
            "max_draft_tokens": trial.suggest_int("prompt_lookup.max_draft_tokens", *LOOKUP_DRAFT_RANGE)}
    if kind in ("layer_skip", "hybrid"):
        parts["layer_skip"] = {
            "skip_set": suggest_skip_set(trial, num_layers).to_dict(),
            "threshold": trial.suggest_categorical("layer_skip.threshold", list(THRESHOLDS)),
            "max_draft_tokens": trial.suggest_int("layer_skip.max_draft_tokens", *LAYER_SKIP_DRAFT_RANGE)}
    if kind == "hybrid":
        return {"kind": kind, **parts}
    return {"kind": kind, **parts[kind]}


def policy_skip_ratio(policy: dict[str, Any], num_layers: int) -> float | None:
    """The skip ratio of a policy's layer-skip part, None when it has none."""
    layer = policy if policy["kind"] == "layer_skip" else policy.get("layer_skip")
    return SkipSet.from_dict(layer["skip_set"]).skip_ratio(num_layers) if layer else None


def make_objective(model: Any, num_layers: int, workload: Workload, costs: StepCosts, config: SearchConfig,
                   progress: Callable[[str], None]) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        policy = suggest_policy(trial, num_layers, config)
        ratio = policy_skip_ratio(policy, num_layers)
        trial.set_user_attr("policy", policy)
        trial.set_user_attr("skip_ratio", ratio or 0.0)
        if ratio is not None and not config.min_skip_ratio <= ratio <= config.max_skip_ratio:
            raise optuna.TrialPruned()
        score = score_policy(model, policy, num_layers, workload, costs)
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


def top_candidates(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """The `count` best completed trials by predicted speedup, one per distinct score: the score is exact, so two
    trials scoring the same to the last digit behaved the same on every prompt (e.g. lookup policies differing
    only in an n-gram size that never matched), and timing both would spend the confirmation on one policy."""
    seen: set[float] = set()
    chosen = []
    for trial in sorted(completed_trials(study), key=lambda t: (-t.value, t.number)):
        if trial.value not in seen:
            seen.add(trial.value)
            chosen.append(trial)
        if len(chosen) == count:
            break
    return chosen


def choose_policy(candidates: list[dict[str, Any]], trials: int, config: SearchConfig
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The domain's policy and metrics from its confirmed candidates ({"policy", "predicted", "confirmed"
    (a WallClock dict), "trial"}): the fastest in wall clock, or plain decoding when none reaches
    `config.min_speedup` (the searched policy is still reported). `speedup` is the confirmed one."""
    if not candidates:
        return {"kind": "none"}, {"speedup": 1.0, "predicted_speedup": 1.0, "confirmed_speedup": 1.0,
                                  "mean_accepted_tokens": 1.0, "acceptance_rate": 0.0, "trials": float(trials),
                                  "mismatch_rate": 0.0}
    best = max(candidates, key=lambda c: c["confirmed"]["speedup"])
    confirmed = best["confirmed"]
    metrics: dict[str, Any] = {
        "speedup": confirmed["speedup"], "confirmed_speedup": confirmed["speedup"],
        "predicted_speedup": best["predicted"], "search_predicted_speedup": best["search_predicted"],
        "mean_accepted_tokens": confirmed["mean_accepted_tokens"], "acceptance_rate": confirmed["acceptance_rate"],
        "mismatch_rate": max(c["confirmed"]["mismatch_rate"] for c in candidates),
        "confirm_prompts": confirmed["prompts"], "trials": float(trials), "best_trial": float(best["trial"]),
        "skip_ratio": float(best["skip_ratio"])}
    if confirmed["speedup"] < config.min_speedup:
        metrics["searched_policy"] = json.dumps(best["policy"])
        return {"kind": "none"}, {**metrics, "speedup": 1.0, "searched_speedup": confirmed["speedup"]}
    return best["policy"], metrics
