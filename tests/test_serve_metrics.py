"""The speculative-decoding counters of one generation, token trees included (no server needed)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from knnssd.serve.metrics import Metrics
from knnssd.engine.stats import StatsRecorder


def counters(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.text().decode()) for s in family.samples}


def test_a_tree_step_is_one_draft_and_its_nodes_are_draft_tokens():
    recorder = StatsRecorder(prefill_seconds=0.0)
    recorder.record_step(5, 2, 0, [3, 1, 1])  # a tree: 3 nodes at depth 1, path of 2 accepted
    recorder.record_step(2, 1, 0)  # a path of 2, 1 accepted
    recorder.record_step(0, 0, 0)  # a plain step
    metrics = Metrics()
    metrics.record_generation("qa", False, recorder.finish(new_tokens=6, total_seconds=1.0))
    got = counters(metrics)
    domain = (("domain", "qa"),)
    assert got[("knnssd_spec_decode_num_drafts_total", domain)] == 2  # two steps verified drafts, one a tree
    assert got[("knnssd_spec_decode_num_draft_tokens_total", domain)] == 7
    assert got[("knnssd_spec_decode_num_accepted_tokens_total", domain)] == 3
    assert got[("knnssd_spec_decode_verify_steps_total", domain)] == 3
