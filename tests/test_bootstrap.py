"""The paired bootstrap (`pipeline.bootstrap`) on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bootstrap import MIN_VERDICT_PROMPTS, TOO_FEW, difference_interval, speedup_interval, verdict


def test_identical_times_give_a_point_interval():
    interval = speedup_interval([2.0] * 5, [1.0] * 5)
    assert interval.estimate == interval.low == interval.high == 2.0


def test_the_interval_covers_the_true_speedup_about_95_percent_of_the_time():
    """Prompts whose plain time is 1-3 s and whose method time is plain / 1.25 times log-normal noise (a
    known mean of 1 on the time): the true pooled speedup is 1.25. Over 400 simulated studies of 30 prompts,
    the 95% interval must cover it in 88-99% of them. The percentile bootstrap is a little liberal with few
    prompts: over 1000 studies it covered 88.6% at 10 prompts, 90.7% at 20, 92.6% at 30."""
    rng = np.random.default_rng(7)
    covered = 0
    studies = 400
    for study in range(studies):
        plain = rng.uniform(1.0, 3.0, 30)
        noise = rng.lognormal(mean=-0.02, sigma=0.2, size=30)  # E[noise] = exp(-0.02 + 0.02) = 1
        interval = speedup_interval(plain, plain / 1.25 * noise, resamples=1000, seed=study)
        covered += interval.low <= 1.25 <= interval.high
    assert 0.88 <= covered / studies <= 0.99, covered / studies


def test_difference_verdicts_on_known_answers():
    rng = np.random.default_rng(1)
    plain = rng.uniform(1.0, 2.0, 30)
    faster = plain / 1.3 * rng.lognormal(0, 0.03, 30)
    slower = plain / 1.1 * rng.lognormal(0, 0.03, 30)
    same = plain / 1.1 * rng.lognormal(0, 0.03, 30)
    assert verdict(difference_interval(plain, faster, [slower]), 30) == "beats"
    assert verdict(difference_interval(plain, slower, [faster]), 30) == "loses to"
    tie = difference_interval(plain, same, [slower])
    assert verdict(tie, 30) == "no significant difference from" and tie.low < 0 < tie.high
    mean_of_two = difference_interval(plain, faster, [slower, same])  # against the mean of several methods
    assert mean_of_two.estimate == pytest.approx(plain.sum() / faster.sum()
                                                 - (plain.sum() / slower.sum() + plain.sum() / same.sum()) / 2)


def test_unpaired_series_are_refused():
    with pytest.raises(ValueError):
        speedup_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        difference_interval([1.0], [1.0], [])


def test_no_verdict_on_a_handful_of_prompts():
    """Two methods with the same true speed (each prompt's time log-normal noise of 30% around plain / 1.2):
    over 3 prompts the percentile bootstrap calls a difference far more often than 5% of the time, so no
    verdict is given below MIN_VERDICT_PROMPTS; at 30 prompts it is near its nominal rate."""
    rng = np.random.default_rng(3)

    def false_calls(prompts: int, studies: int = 300) -> float:
        calls = 0
        for study in range(studies):
            plain = rng.uniform(1.0, 3.0, prompts)
            a = plain / 1.2 * rng.lognormal(-0.045, 0.3, prompts)
            b = plain / 1.2 * rng.lognormal(-0.045, 0.3, prompts)
            calls += difference_interval(plain, a, [b], resamples=500, seed=study).excludes_zero()
        return calls / studies

    assert false_calls(3) > 0.2  # what a verdict on 3 prompts would claim
    assert false_calls(30) < 0.12
    tiny = difference_interval([1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [[1.0, 2.0, 3.0]])
    assert tiny.excludes_zero() and verdict(tiny, 3) == TOO_FEW
    assert verdict(tiny, MIN_VERDICT_PROMPTS) == "beats"


def test_a_ratio_difference_pairs_two_ratios_with_their_own_numerators():
    from pipeline.bootstrap import ratio_difference_interval

    tokens, steps = [10, 12, 9, 11], [5, 6, 6, 4]
    same = ratio_difference_interval(tokens, steps, tokens, steps)
    assert same.estimate == 0 and same.low == 0 == same.high
    more = ratio_difference_interval([t + 3 for t in tokens], steps, tokens, steps)
    assert more.estimate == pytest.approx(12 / 21) and more.low > 0
    with pytest.raises(ValueError):
        ratio_difference_interval(tokens, steps[:3], tokens, steps)
