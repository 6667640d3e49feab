"""Paired bootstrap over prompts: confidence intervals for speedups and for differences between methods.

Every method of the study decodes the same prompts, each right after plain decoding of it, so a resample draws
prompts (with replacement) and keeps every method's times on them together:

    speedup of a method on a resample   = sum of plain seconds / sum of its seconds over the drawn prompts
    difference of a and b on a resample = speedup(a) - speedup(b)   (b may be the mean of several methods)
    95% interval                        = the 2.5th and 97.5th percentiles over `resamples` draws

A verdict says "beats" or "loses to" only when the interval of the difference excludes zero, and "no
significant difference" otherwise; on fewer than MIN_VERDICT_PROMPTS prompts it says none. A percentile bootstrap
over a handful of prompts is far too narrow: 3 prompts have only 10 distinct resamples, and a difference seen on
all 3 would be called significant however noisy the prompts are (Spec-Bench's MT-bench categories have 10
prompts, 3 of them held out). numpy only (no torch), so a study's report can be rebuilt anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95
MIN_VERDICT_PROMPTS = 10  # the headline run: at least 10 held-out prompts per domain
TOO_FEW = "too few prompts to compare with"


@dataclass(frozen=True)
class Interval:
    """A point estimate (on the prompts as they are) and its bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def describe(self, signed: bool = False) -> str:
        form = "+.3f" if signed else ".3f"
        return f"{self.estimate:{form}} [{self.level:.1%} CI {self.low:{form}}, {self.high:{form}}]".replace(".0% CI", "% CI")


def _draws(prompts: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, prompts) indices of prompts drawn with replacement."""
    return np.random.default_rng(seed).integers(0, prompts, size=(resamples, prompts))


def _ratios(plain: np.ndarray, seconds: np.ndarray, draws: np.ndarray) -> np.ndarray:
    return plain[draws].sum(axis=1) / seconds[draws].sum(axis=1)


def _interval(estimate: float, samples: np.ndarray, level: float = LEVEL) -> Interval:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(estimate=float(estimate), low=float(low), high=float(high), level=level)


def speedup_interval(plain: Sequence[float], seconds: Sequence[float], resamples: int = RESAMPLES,
                     seed: int = 0) -> Interval:
    """sum(plain) / sum(seconds) over paired prompts, with its bootstrap interval."""
    p, s = np.asarray(plain, dtype=float), np.asarray(seconds, dtype=float)
    if p.shape != s.shape or p.size == 0:
        raise ValueError("speedup_interval needs the same non-zero number of plain and method times")
    return _interval(p.sum() / s.sum(), _ratios(p, s, _draws(p.size, resamples, seed)))


def difference_interval(plain: Sequence[float], seconds: Sequence[float], others: Sequence[Sequence[float]],
                        resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """speedup(seconds) - mean over `others` of speedup(other), every series on the same prompts, with its
    `level` interval."""
    p, s = np.asarray(plain, dtype=float), np.asarray(seconds, dtype=float)
    o = [np.asarray(other, dtype=float) for other in others]
    if not o or any(x.shape != p.shape for x in (s, *o)) or p.size == 0:
        raise ValueError("difference_interval needs paired, non-empty series")
    draws = _draws(p.size, resamples, seed)
    samples = _ratios(p, s, draws) - np.mean([_ratios(p, x, draws) for x in o], axis=0)
    estimate = p.sum() / s.sum() - np.mean([p.sum() / x.sum() for x in o])
    return _interval(estimate, samples, level)


def ratio_difference_interval(numerator: Sequence[float], denominator: Sequence[float],
                              base_numerator: Sequence[float], base_denominator: Sequence[float],
                              resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """sum(numerator) / sum(denominator) - sum(base_numerator) / sum(base_denominator), every series on the same
    prompts (each ratio with its own numerator, e.g. tokens per verify step of two policies whose committed
    tokens differ past an EOS), with its `level` interval."""
    series = [np.asarray(x, dtype=float) for x in (numerator, denominator, base_numerator, base_denominator)]
    if any(x.shape != series[0].shape for x in series) or series[0].size == 0:
        raise ValueError("ratio_difference_interval needs paired, non-empty series")
    n, d, bn, bd = series
    draws = _draws(n.size, resamples, seed)
    samples = _ratios(n, d, draws) - _ratios(bn, bd, draws)
    return _interval(n.sum() / d.sum() - bn.sum() / bd.sum(), samples, level)


def verdict(difference: Interval, prompts: int) -> str:
    """"beats", "loses to" or "no significant difference from", from the interval of a difference over
    `prompts` paired prompts; TOO_FEW below MIN_VERDICT_PROMPTS."""
    if prompts < MIN_VERDICT_PROMPTS:
        return TOO_FEW
    if difference.low > 0:
        return "beats"
    if difference.high < 0:
        return "loses to"
    return "no significant difference from"
