"""The step-cost table (`pipeline.costs`): timed once per node under a lock, keyed by the kernel plan, and a price
that nothing measured during a trace enters, so two workers score one policy alike."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from knnssd.engine.kernels import KernelPlan
from knnssd.engine.models import LoadedModel
from knnssd.engine.skipset import SkipSet
from pipeline.costs import StepCosts, step_costs_for, table_key
from pipeline.replay import Replayed, Step, Trace
from pipeline.scoring import Workload, build_workload, score_policy
from tests.conftest import tiny_model
from tests.test_replay import costs, repetitive_prompt


def slow_timer(counter: Path):
    """A stand-in for `time_step_costs` that takes a second and counts its calls in `counter`."""
    def timer(model) -> StepCosts:
        with counter.open("a") as out:
            out.write("timed\n")
        time.sleep(1.0)
        return costs()
    return timer


def race(folder: str, counter: str, key: str) -> None:
    step_costs_for(None, Path(folder), key, timer=slow_timer(Path(counter)))


def test_workers_starting_together_time_the_table_once_and_the_others_read_it(tmp_path):
    counter = tmp_path / "timings.txt"
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=race, args=(str(tmp_path / "costs"), str(counter), "node-model")) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert counter.read_text().splitlines() == ["timed"]  # one timing; the two others waited, then read it
    assert StepCosts.from_dict(json.loads((tmp_path / "costs" / "node-model.json").read_text())) == costs()


def loaded_with(plan: KernelPlan | None) -> LoadedModel:
    return LoadedModel(model=None, tokenizer=None, name="m", source="m", model_hash="ab" * 32,
                       device=torch.device("cpu"), dtype=torch.float32, threads=2, kernels=plan)


def test_a_table_timed_with_another_kernel_plan_is_not_reused(tmp_path):
    compiled = KernelPlan(enabled=True, device="cpu", threads=2, rows=("rows",) * 32, attention="rows")
    library = dataclasses.replace(compiled, rows=("linear",) * 3 + ("packed8",) * 5 + ("transposed",) * 8
                                  + ("linear",) * 16, reason="no compiler", attention="grouped")
    keys = {table_key(loaded_with(plan)) for plan in (compiled, library, None)}
    assert len(keys) == 3 and table_key(loaded_with(None)).endswith("-plain-t2")
    assert table_key(loaded_with(compiled)) == table_key(loaded_with(dataclasses.replace(compiled)))
    counter = tmp_path / "timings.txt"
    for plan in (compiled, compiled, library):
        step_costs_for(None, tmp_path, table_key(loaded_with(plan)), timer=slow_timer(counter))
    assert len(counter.read_text().splitlines()) == 2  # the library plan timed its own table


def test_a_table_of_the_older_format_is_timed_again(tmp_path):
    old = {k: v for k, v in costs().to_dict().items() if k != "prefill"}
    (tmp_path / "k.json").write_text(json.dumps(old))
    counter, messages = tmp_path / "timings.txt", []
    assert step_costs_for(None, tmp_path, "k", messages.append, timer=slow_timer(counter)) == costs()
    assert counter.read_text().splitlines() == ["timed"] and "older format" in messages[0]


def test_two_workers_tracing_the_same_prompts_score_a_policy_to_the_last_digit():
    """Each worker decodes its prompts plainly itself, with its own prefill seconds: the score must not see them."""
    model = tiny_model("llama")
    workload = build_workload(model, [repetitive_prompt(0), repetitive_prompt(1)], 16)
    other = Workload(traces=tuple(dataclasses.replace(t, prefill_seconds=t.prefill_seconds * 7 + 0.3,
                                                      seconds=t.seconds * 3) for t in workload.traces),
                     caches=workload.caches)
    table = costs()
    for policy in ({"kind": "prompt_lookup"},
                   {"kind": "layer_skip", "skip_set": {"attn": [2]}, "threshold": 0.0, "max_draft_tokens": 3}):
        assert score_policy(model, policy, 4, workload, table) == score_policy(model, policy, 4, other, table)


def test_draft_forwards_and_prefill_are_priced_at_their_context():
    table = costs()
    trace = Trace(prompt=tuple(range(16)), tokens=(1, 2, 3, 4), max_new_tokens=4, prefill_seconds=9.0, seconds=9.0)
    skip = SkipSet.of(attn=[0])
    steps = Replayed(steps=(Step(drafted=2, accepted=2, forwards=2),))
    expected = (table.prefill_seconds(16) + table.verify_seconds(3, 16)
                + 2 * table.draft_seconds(skip, 16.5))  # forwards at 16 and 17 cached tokens
    assert table.generation_seconds(trace, steps, skip) == pytest.approx(expected)
    assert table.draft_seconds(skip, 512) > table.draft_seconds(skip, 16)
    assert table.plain_seconds(trace) == pytest.approx(table.prefill_seconds(16) + sum(
        table.verify_seconds(1, 16 + i) for i in range(3)))
