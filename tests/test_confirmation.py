"""Confirmation (`pipeline.confirm`) under injected timing noise: wall clock overrules the best predicted
candidate only when the difference is larger than the timings' spread.

The noise is injected (a stand-in for `measure_policies` returning true seconds times random factors): a busy
node's noise cannot be produced on demand otherwise."""

from __future__ import annotations

import random

from pipeline.confirm import confirm, decide, pooled_figures
from pipeline.measure import Measured, WallClock

PROMPTS = 8


def noisy_rounds(true_seconds: dict[str, float], noise: float, seed: int):
    """A `measure_round` whose every run takes its candidate's true seconds per prompt (plain: 1.2 s, prompt
    lengths varying) times a lognormal factor of spread `noise`."""
    rng = random.Random(seed)
    length = [0.5 + 0.25 * i for i in range(PROMPTS)]

    def run(true: float) -> tuple[float, ...]:
        return tuple(true * scale * rng.lognormvariate(0.0, noise) for scale in length)

    def measure_round(index: int) -> Measured:
        seconds = {name: run(true) for name, true in true_seconds.items()}
        plain = run(1.2)
        policies = {name: WallClock(speedup=sum(plain) / sum(s), mean_accepted_tokens=2.0, acceptance_rate=0.5,
                                    plain_seconds=sum(plain), seconds=sum(s), mismatch_rate=0.0, prompts=PROMPTS,
                                    threads=1) for name, s in seconds.items()}
        return Measured(policies=policies, traces=(), plain_seconds=plain, seconds=seconds)
    return measure_round


def test_noise_that_swamps_the_difference_keeps_the_best_predicted_candidate():
    """'other' is truly 3% faster, but each run varies by about 30%: one sample would pick it about half the
    time (as a single noisy confirmation picked a 2.00x that was 1.13x held out); rounds bounded by 3."""
    kept, one_sample_picks = 0, 0
    for seed in range(30):
        measure = noisy_rounds({"best": 1.0, "other": 0.97, "third": 1.05}, noise=0.3, seed=seed)
        decision, rounds = confirm(["best", "other", "third"], measure, max_rounds=3, seed=seed)
        assert 1 <= decision.rounds == len(rounds) <= 3
        kept += decision.chosen == "best"
        first = rounds[0].seconds
        one_sample_picks += min(first, key=lambda name: sum(first[name])) != "best"
        if decision.chosen == "best" and "also the fastest" not in decision.reason:
            assert decision.rounds == 3 and "kept" in decision.reason and "spread" in decision.reason
    assert kept >= 27  # kept unless the noise itself fooled the interval
    assert one_sample_picks >= 10  # what the old rule (fastest in one sample) would have done


def test_a_truly_faster_candidate_is_chosen_when_the_noise_is_small():
    for seed in range(10):
        measure = noisy_rounds({"best": 1.0, "other": 0.8, "third": 1.1}, noise=0.02, seed=seed)
        decision, rounds = confirm(["best", "other", "third"], measure, max_rounds=3, seed=seed)
        assert decision.chosen == "other" and decision.rounds == 1 and "faster" in decision.reason
        assert pooled_figures(rounds)["other"]["speedup"] > pooled_figures(rounds)["best"]["speedup"]


def test_the_best_predicted_candidate_fastest_in_wall_clock_ends_after_one_round():
    measure = noisy_rounds({"best": 0.8, "other": 1.0}, noise=0.02, seed=0)
    decision, rounds = confirm(["best", "other"], measure, max_rounds=3)
    assert decision.chosen == "best" and len(rounds) == 1


def test_another_round_is_due_while_the_interval_straddles_zero_and_rounds_remain():
    measure = noisy_rounds({"best": 1.0, "other": 0.99}, noise=0.4, seed=3)
    rounds = [measure(0)]
    while decide(["best", "other"], rounds, max_rounds=5) is None:
        rounds.append(measure(len(rounds)))
    assert len(rounds) <= 5
    figures = pooled_figures(rounds)
    assert figures["best"]["rounds"] == len(rounds)
    assert figures["best"]["plain_seconds"] == sum(sum(r.plain_seconds) for r in rounds)
