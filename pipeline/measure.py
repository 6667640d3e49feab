"""Timed draft-acceptance measurement: one drafter on a set of prompts against plain decoding.

Plain decoding is timed again right before the drafted run of every prompt of every trial, in the same process,
so that machine drift (another worker starting or finishing, thermal changes) hits both sides of each ratio
alike. A baseline timed once at start-up does not cancel it: measured here, it inflated trials run after a
neighbouring worker finished by up to 1.4x.

    speedup = sum over prompts of plain seconds / sum of drafted seconds (adjacent runs)
    mean_accepted_tokens, acceptance_rate: pooled over prompts by knnssd.stats.Tally
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from knnssd.decoding import GenerationConfig, generate, warm_up
from knnssd.drafters import Drafter
from knnssd.stats import Tally


@dataclass(frozen=True)
class Baseline:
    """The trial prompts' ids (1, T) and their plain-decoding tokens (for the losslessness check)."""

    prompt_ids: tuple[torch.Tensor, ...]
    tokens: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Measurement:
    speedup: float
    mean_accepted_tokens: float
    acceptance_rate: float
    plain_seconds: float
    seconds: float
    lossless: bool
    threads: int  # torch's thread count while measuring

    def to_dict(self) -> dict[str, float]:
        return {"speedup": self.speedup, "mean_accepted_tokens": self.mean_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "plain_seconds": self.plain_seconds,
                "seconds": self.seconds, "lossless": float(self.lossless), "threads": float(self.threads)}


def measure_baseline(model: torch.nn.Module, prompt_ids: list[torch.Tensor], max_new_tokens: int) -> Baseline:
    """Plain decoding of every trial prompt once (its tokens judge every trial's output)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    warm_up(model, prompt_ids[0])
    runs = [generate(model, ids, config) for ids in prompt_ids]
    return Baseline(prompt_ids=tuple(prompt_ids), tokens=tuple(r.token_ids for r in runs))


def measure_policy(model: torch.nn.Module, drafter: Drafter | None, baseline: Baseline, max_new_tokens: int,
                   report: Callable[[int, float], bool] | None = None) -> Measurement | None:
    """Decode every baseline prompt with `drafter`, each right after plain decoding of it. After each prompt,
    `report(step, speedup so far)` may return True to stop early (a pruned trial): then None is returned."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    plain = seconds = 0.0
    tally = Tally()
    lossless = True
    for step, (ids, tokens) in enumerate(zip(baseline.prompt_ids, baseline.tokens)):
        plain += generate(model, ids, config).stats.total_seconds
        result = generate(model, ids, config, drafter)
        seconds += result.stats.total_seconds
        tally += Tally.of(result.stats)
        lossless &= result.token_ids == tokens
        if report is not None and report(step, plain / seconds):
            return None
    return Measurement(speedup=plain / seconds, mean_accepted_tokens=tally.mean_accepted_tokens,
                       acceptance_rate=tally.acceptance_rate, plain_seconds=plain, seconds=seconds,
                       lossless=lossless, threads=torch.get_num_threads())
