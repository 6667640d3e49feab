"""The server's Prometheus metrics, in a registry of its own (several apps in one process do not collide).

Named after vLLM's (`vllm:time_to_first_token_seconds`, `vllm:spec_decode_num_draft_tokens`, ...) and
llama.cpp's server, with the prefix `knnssd_` and per routed domain where speculative decoding is concerned.
Definitions as in `knnssd.engine.stats`: acceptance = accepted / drafted; mean accepted length (the bonus token
counted) = (accepted + verify steps) / verify steps, both computable from these counters.

    knnssd_requests_total{endpoint, status}          responses by HTTP status (499: the client went away)
    knnssd_request_success_total{finish_reason}       finished generations: stop, length
    knnssd_prompt_tokens_total, knnssd_generation_tokens_total
    knnssd_time_to_first_token_seconds                arrival to the first token (waits included)
    knnssd_time_per_output_token_seconds              (last token - first token) / (tokens - 1), per request
    knnssd_e2e_request_latency_seconds                arrival to the last token
    knnssd_queue_depth, knnssd_requests_running       requests waiting / generating now
    knnssd_routed_requests_total{domain, fallback}
    knnssd_spec_decode_num_drafts_total{domain}       verify steps that checked at least one drafted token
    knnssd_spec_decode_num_draft_tokens_total{domain}
    knnssd_spec_decode_num_accepted_tokens_total{domain}
    knnssd_spec_decode_verify_steps_total{domain}     every verify step (plain steps too)
    knnssd_spec_decode_num_accepted_tokens_per_pos_total{domain, position}
    knnssd_batch_size                                 requests verified together, per step (histogram)
    knnssd_step_drafted_tokens                        draft tokens one request put into one step (histogram)
    knnssd_step_accepted_tokens                       of them accepted (histogram)
    knnssd_bundle_info{bundle}                        1 for the version serving now
    knnssd_bundle_reloads_total{outcome}              swapped, refused, failed
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from knnssd.engine.stats import GenerationStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
DRAFT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class Metrics:
    """Every metric of one server; `text()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("knnssd_requests", "Responses by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.success = Counter("knnssd_request_success", "Finished generations by finish reason",
                               ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("knnssd_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("knnssd_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("knnssd_time_to_first_token_seconds", "Arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("knnssd_time_per_output_token_seconds", "Seconds per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("knnssd_e2e_request_latency_seconds", "Arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("knnssd_queue_depth", "Requests waiting for the model", registry=r)
        self.running = Gauge("knnssd_requests_running", "Requests generating now", registry=r)
        self.routed = Counter("knnssd_routed_requests", "Requests by routed domain", ["domain", "fallback"],
                              registry=r)
        self.drafts = Counter("knnssd_spec_decode_num_drafts", "Verify steps with at least one drafted token",
                              ["domain"], registry=r)
        self.draft_tokens = Counter("knnssd_spec_decode_num_draft_tokens", "Drafted tokens", ["domain"], registry=r)
        self.accepted_tokens = Counter("knnssd_spec_decode_num_accepted_tokens", "Accepted drafted tokens",
                                       ["domain"], registry=r)
        self.verify_steps = Counter("knnssd_spec_decode_verify_steps", "Verify steps (full-model forwards)",
                                    ["domain"], registry=r)
        self.accepted_per_pos = Counter("knnssd_spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted drafted tokens by position in the draft (0-based)",
                                        ["domain", "position"], registry=r)
        self.batch_size = Histogram("knnssd_batch_size", "Requests verified together in one step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_drafted = Histogram("knnssd_step_drafted_tokens", "Draft tokens of one request in one step",
                                      buckets=DRAFT_BUCKETS, registry=r)
        self.step_accepted = Histogram("knnssd_step_accepted_tokens", "Accepted draft tokens of one request in one "
                                       "step", buckets=DRAFT_BUCKETS, registry=r)
        self.bundle = Gauge("knnssd_bundle_info", "The bundle version serving now", ["bundle"], registry=r)
        self.reloads = Counter("knnssd_bundle_reloads", "Alias moves handled, by outcome", ["outcome"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def record_generation(self, domain: str, fallback: bool, stats: GenerationStats) -> None:
        """The routing and speculative-decoding counts of one generation."""
        self.routed.labels(domain, str(fallback).lower()).inc()
        self.generation_tokens.inc(stats.new_tokens)
        plain_passes = stats.verify_widths[0] if stats.verify_widths else 0  # width 1: nothing drafted
        self.drafts.labels(domain).inc(stats.verify_steps - plain_passes)  # a tree's step counts once
        self.draft_tokens.labels(domain).inc(stats.drafted_tokens)
        self.accepted_tokens.labels(domain).inc(stats.accepted_tokens)
        self.verify_steps.labels(domain).inc(stats.verify_steps)
        for position, accepted in enumerate(stats.accepted_by_position):
            self.accepted_per_pos.labels(domain, str(position)).inc(accepted)

    def serving(self, label: str, previous: str | None = None) -> None:
        if previous is not None:
            self.bundle.remove(previous)
        self.bundle.labels(label).set(1)
