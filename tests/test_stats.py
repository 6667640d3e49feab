"""Statistics formulas, with an injected clock so times are exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import LayerSkipConfig, LayerSkipDrafter, PromptLookupDrafter
from knnssd.engine.skipset import SkipSet
from knnssd.engine.stats import StatsRecorder
from tests.conftest import tiny_model


def test_recorder_formulas():
    recorder = StatsRecorder()
    recorder.record_step(drafted=3, accepted=3)
    recorder.record_step(drafted=2, accepted=0)
    recorder.record_step(drafted=0, accepted=0)
    stats = recorder.finish(new_tokens=7, total_seconds=2.0)
    assert (stats.drafted_tokens, stats.accepted_tokens, stats.verify_steps) == (5, 3, 3)
    assert stats.acceptance_rate == pytest.approx(3 / 5)
    assert stats.mean_accepted_tokens == pytest.approx((3 + 3) / 3)
    assert stats.acceptance_by_position == (0.5, 0.5, 1.0)
    assert stats.tokens_per_second == pytest.approx(3.5)


def test_stats_of_a_real_generation_are_consistent():
    model = tiny_model("llama", seed=5)
    prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731  every reading advances one "second"
    drafter = LayerSkipDrafter(SkipSet.of(attn=[3]), LayerSkipConfig(threshold=0.0, max_draft_tokens=3))
    result = generate(model, prompt, GenerationConfig(max_new_tokens=20, eos_token_ids=()), drafter, clock=clock)
    stats = result.stats
    assert stats.new_tokens == 20
    # every token after the prefill's comes from a verification step: accepted drafts plus one bonus each
    assert stats.accepted_tokens + stats.verify_steps == stats.new_tokens - 1
    assert stats.prefill_seconds == 1.0
    assert stats.verify_seconds == stats.verify_steps  # one tick per timed phase
    # a step drafts (one tick) unless only the bonus token fits in max_new_tokens, as in the last step here
    assert stats.draft_seconds == stats.verify_steps - 1
    assert stats.total_seconds > stats.draft_seconds + stats.verify_seconds + stats.prefill_seconds
    assert 0 < stats.acceptance_rate <= 1 and 1 <= stats.mean_accepted_tokens <= 4
    d = stats.to_dict()
    for key in ("drafted_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_tokens",
                "acceptance_by_position", "draft_seconds", "verify_seconds", "tokens_per_second"):
        assert key in d


def test_plain_decoding_stats():
    model = tiny_model("qwen2", seed=1)
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    stats = generate(model, prompt, GenerationConfig(max_new_tokens=10, eos_token_ids=())).stats
    assert (stats.drafted_tokens, stats.verify_steps, stats.mean_accepted_tokens) == (0, 9, 1.0)
    assert stats.acceptance_rate == 0.0 and stats.draft_seconds == 0.0


def test_tally_pools_counts_and_has_one_empty_rule():
    from knnssd.engine.stats import Tally

    assert Tally().mean_accepted_tokens == 0.0 and Tally().acceptance_rate == 0.0
    total = Tally(accepted=3, drafted=4, steps=2) + Tally(accepted=1, drafted=4, steps=2)
    assert total == Tally(accepted=4, drafted=8, steps=4)
    assert total.mean_accepted_tokens == 2.0 and total.acceptance_rate == 0.5


def test_a_one_token_measurement_has_no_verify_step_and_no_division_by_zero():
    """--max-new-tokens 1: the prefill alone gives the token, so no step is verified."""
    from pipeline.measure import measure_policies
    from pipeline.scoring import build_workload, score_policy
    from pipeline.costs import StepCosts

    model = tiny_model("llama")
    ids = [torch.tensor([[5, 6, 7, 8]])]
    result = measure_policies(model, {"lookup": {"kind": "prompt_lookup"}}, ids, max_new_tokens=1,
                              num_layers=4).policies["lookup"]
    assert result.mismatch_rate == 0.0 and result.mean_accepted_tokens == 0.0 and result.acceptance_rate == 0.0
    costs = StepCosts(contexts=(4, 8), widths=(1, 2), verify=((1.0, 1.5), (1.0, 1.5)), draft_forward=0.5,
                      attention=0.01, mlp=0.01, threads=1, device="cpu")
    score = score_policy(model, {"kind": "layer_skip", "skip_set": {"attn": [1]}}, 4, build_workload(model, ids, 1),
                         costs)
    assert score.predicted_speedup == 1.0 and score.mean_accepted_tokens == 0.0
