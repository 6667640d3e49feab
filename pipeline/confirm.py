"""Choosing a domain's policy among its search's best candidates: wall clock overrules the prediction only
beyond its own spread.

The search ranks candidates by predicted speedup (`pipeline.scoring`): deterministic, but a model of the
machine. Wall clock is the real thing, but one sample of it is noisy: in one Spec-Bench calibration with other
commands running beside it, three candidates predicted at 1.13-1.17 confirmed at 0.58, 1.48 and 2.00, and the
2.00 one measured 1.13 on held-out prompts. So:

1. `top_candidates`: the best `confirm_candidates` distinct policies, best predicted first.
2. `confirm`: rounds of `pipeline.measure` (every candidate and plain decoding on the same prompts,
   interleaved). After each round, the candidate fastest in wall clock (seconds pooled over the rounds so far)
   is compared with the best predicted one, prompt by prompt: the paired bootstrap interval
   (`pipeline.bootstrap.difference_interval`: prompts resampled, each prompt's seconds summed over the rounds) of
   speedup(fastest) - speedup(best predicted), at level 1 - 5% / (max_rounds x other candidates): the
   fastest of several candidates, looked at after every round, would otherwise beat the best predicted one
   by chance far more often than 5% of the time.
   - The best predicted is the fastest: it is kept.
   - The interval excludes zero: the faster candidate is chosen.
   - Otherwise another round, up to `max_rounds`; after the last, the best predicted is kept, saying so.
3. `choose_policy`: that candidate, or plain decoding where its wall clock is below `min_speedup`. The
   bundle's metrics record why (`confirmation`) and after how many rounds (`confirm_rounds`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna

from pipeline.bootstrap import LEVEL, difference_interval
from pipeline.measure import Measured


@dataclass(frozen=True)
class Decision:
    """Which candidate (by name) a confirmation chose, after how many rounds, and why, in words."""

    chosen: str
    rounds: int
    reason: str


def top_candidates(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """The `count` best completed trials by predicted speedup, best first, each a policy not chosen yet and a
    score not seen yet. By policy: workers on different nodes score one policy with different step-cost tables
    (`pipeline.costs`), so one policy can appear with two scores. By score: within one table the score is exact,
    so two trials scoring the same to the last digit behaved the same on every prompt (e.g. lookup policies
    differing only in an n-gram size that never matched), and timing both would spend the confirmation on one
    policy."""
    policies: set[str] = set()
    scores: set[float] = set()
    chosen = []
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for trial in sorted(completed, key=lambda t: (-t.value, t.number)):
        policy = json.dumps(trial.user_attrs.get("policy"), sort_keys=True)
        if policy not in policies and trial.value not in scores:
            policies.add(policy)
            scores.add(trial.value)
            chosen.append(trial)
        if len(chosen) == count:
            break
    return chosen


def pooled_seconds(rounds: Sequence[Measured]) -> tuple[list[float], dict[str, list[float]]]:
    """Per prompt, plain seconds and each candidate's seconds, summed over the rounds."""
    plain = [sum(values) for values in zip(*(r.plain_seconds for r in rounds))]
    names = rounds[0].seconds
    return plain, {name: [sum(values) for values in zip(*(r.seconds[name] for r in rounds))] for name in names}


def decide(order: Sequence[str], rounds: Sequence[Measured], max_rounds: int, seed: int = 0) -> Decision | None:
    """The decision after `rounds` (see the module docstring), or None when another round is due. `order`: the
    candidates' names, best predicted first."""
    plain, seconds = pooled_seconds(rounds)
    best = order[0]
    fastest = min(order, key=lambda name: (sum(seconds[name]), order.index(name)))
    count = len(rounds)
    if fastest == best:
        return Decision(best, count, f"the best predicted candidate was also the fastest in wall clock "
                                     f"({count} round{'s' if count > 1 else ''})")
    level = 1 - (1 - LEVEL) / (max_rounds * (len(order) - 1))
    difference = difference_interval(plain, seconds[fastest], [seconds[best]], seed=seed, level=level)
    if difference.low > 0:
        return Decision(fastest, count, f"faster in wall clock than the best predicted candidate by "
                                        f"{difference.describe(signed=True)} in speedup over {count} round(s)")
    if count < max_rounds:
        return None
    return Decision(best, count, f"the best predicted candidate was kept: the fastest in wall clock differed from it "
                                 f"by {difference.describe(signed=True)} in speedup after {count} round(s), within "
                                 "the measurement's spread")


def confirm(order: Sequence[str], measure_round: Callable[[int], Measured], max_rounds: int,
            seed: int = 0) -> tuple[Decision, list[Measured]]:
    """Rounds of `measure_round(index)` (every candidate of `order` and plain decoding, timed on the same
    prompts) until `decide` decides, at most `max_rounds`. Returns the decision and every round."""
    rounds: list[Measured] = []
    while True:
        rounds.append(measure_round(len(rounds)))
        decision = decide(order, rounds, max_rounds, seed)
        if decision is not None:
            return decision, rounds


def pooled_figures(rounds: Sequence[Measured]) -> dict[str, dict[str, float]]:
    """Each candidate's wall-clock figures (`WallClock.to_dict`) over every round: speedup and seconds pooled,
    the counted figures from the first round (greedy decoding repeats them), the worst mismatch rate."""
    plain, seconds = pooled_seconds(rounds)
    figures = {}
    for name, values in seconds.items():
        first = rounds[0].policies[name].to_dict()
        figures[name] = {**first, "speedup": sum(plain) / sum(values), "plain_seconds": sum(plain),
                         "seconds": sum(values), "rounds": float(len(rounds)),
                         "mismatch_rate": max(r.policies[name].mismatch_rate for r in rounds)}
    return figures


def choose_policy(candidates: list[dict[str, Any]], trials: int, min_speedup: float,
                  decision: Decision | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The domain's policy and metrics from its confirmed candidates ({"policy", "predicted", "confirmed"
    (`pooled_figures`), "trial"}) and the confirmation's `decision` (the chosen candidate's trial number as
    its name): that candidate, or plain decoding when its wall clock is below `min_speedup` (the searched
    policy is still reported). `speedup` is the confirmed one."""
    if not candidates or decision is None:
        return {"kind": "none"}, {"speedup": 1.0, "predicted_speedup": 1.0, "confirmed_speedup": 1.0,
                                  "mean_accepted_tokens": 1.0, "acceptance_rate": 0.0, "trials": float(trials),
                                  "mismatch_rate": 0.0}
    best = next(c for c in candidates if str(c["trial"]) == decision.chosen)
    confirmed = best["confirmed"]
    metrics: dict[str, Any] = {
        "speedup": confirmed["speedup"], "confirmed_speedup": confirmed["speedup"],
        "predicted_speedup": best["predicted"], "search_predicted_speedup": best["search_predicted"],
        "mean_accepted_tokens": confirmed["mean_accepted_tokens"], "acceptance_rate": confirmed["acceptance_rate"],
        "mismatch_rate": max(c["confirmed"]["mismatch_rate"] for c in candidates),
        "confirm_prompts": confirmed["prompts"], "confirm_rounds": float(decision.rounds),
        "confirmation": decision.reason, "trials": float(trials), "best_trial": float(best["trial"]),
        "skip_ratio": float(best["skip_ratio"])}
    if confirmed["speedup"] < min_speedup:
        metrics["searched_policy"] = json.dumps(best["policy"])
        return {"kind": "none"}, {**metrics, "speedup": 1.0, "searched_speedup": confirmed["speedup"]}
    return best["policy"], metrics
