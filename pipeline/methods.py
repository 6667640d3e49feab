"""The methods of the domain-shift study: what runs one prompt, and how long it took.

Each method is a `Runner`: (prompt ids (1, T), true domain) -> `Outcome`. See `pipeline/study.py` for the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from knnssd.engine.decoding import GenerationConfig, device_clock, generate
from knnssd.errors import KnnSsdError
from knnssd.engine.kernels import transformers_kernels
from knnssd.engine.policy import drafter_from_policy

if TYPE_CHECKING:
    from pipeline.evalconfig import EvalConfig


@dataclass(frozen=True)
class Outcome:
    """One method on one prompt: its new tokens, seconds, and the loop's counts (`knnssd.engine.stats`; 0 for
    transformers' peers): accepted and drafted tokens, verify steps, how many of them verified a token tree and
    how many verified no draft at all (the loop's verify passes of width 1).
    A step's verify width is its drafted tokens (a tree's nodes) plus the last committed token, so the mean
    verify width is (drafted + steps) / steps. `prefill_seconds`: the loop's prefill, part of `seconds` (None for
    transformers' peers, whose `generate` does not report it)."""

    tokens: tuple[int, ...]
    seconds: float
    accepted: int = 0
    drafted: int = 0
    steps: int = 0
    routed_to: str = ""
    tree_steps: int = 0
    no_draft_steps: int = 0
    prefill_seconds: float | None = None

    @classmethod
    def of(cls, result: Any, seconds: float, routed_to: str = "") -> "Outcome":
        """From a `GenerationResult` of the decoding loop."""
        s = result.stats
        return cls(tuple(result.token_ids), seconds, s.accepted_tokens, s.drafted_tokens, s.verify_steps,
                   routed_to, s.tree_steps, s.verify_widths[0] if s.verify_widths else 0, s.prefill_seconds)


Runner = Callable[[torch.Tensor, str], Outcome]


def _ours(model: Any, drafter: Any, max_new_tokens: int) -> Runner:
    def run(ids: torch.Tensor, domain: str) -> Outcome:
        result = generate(model, ids, GenerationConfig(max_new_tokens=max_new_tokens), drafter)
        return Outcome.of(result, result.stats.total_seconds)
    return run


def _routed(runtime: Any, max_new_tokens: int) -> Runner:
    def run(ids: torch.Tensor, domain: str) -> Outcome:
        out = runtime.generate(ids, max_new_tokens=max_new_tokens)
        return Outcome.of(out.result, out.result.stats.total_seconds + out.routing_seconds,
                          "(fallback)" if out.route.fallback else out.route.domain)
    return run


def _oracle(model: Any, drafters: dict[str, Any], max_new_tokens: int) -> Runner:
    def run(ids: torch.Tensor, domain: str) -> Outcome:
        return _ours(model, drafters[domain], max_new_tokens)(ids, domain)
    return run


def _hf(model: Any, max_new_tokens: int, **assist: Any) -> Runner:
    clock = device_clock(next(model.parameters()).device)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id

    def run(ids: torch.Tensor, domain: str) -> Outcome:
        ids = ids.to(next(model.parameters()).device)
        start = clock()
        with torch.inference_mode(), transformers_kernels(model):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, **assist)
        seconds = clock() - start
        return Outcome(tuple(out[0, ids.shape[1]:].tolist()), seconds)
    return run


def mix_drafter(runtime: Any) -> tuple[bool, Any]:
    """(whether the bundle has a mix reference, its drafter): the mix study's policy drafting from the union of
    every domain's store (`BundleRuntime.reference_drafter`)."""
    if "mix" not in runtime.bundle.manifest.get("reference_policies", {}):
        return False, None
    return True, runtime.reference_drafter("mix")


def build_methods(runtime: Any, config: "EvalConfig") -> dict[str, Runner]:
    """Every method of the study for `runtime` (a `BundleRuntime`), plain first. Self-SD(Fix) and the oracle use
    the runtime's own drafters (`runtime.drafters`, each built with its domain's store), so they draft exactly
    as KNN-SSD does when it routes there; extra named policies draft from no store."""
    model, layers = runtime.loaded.model, runtime.loaded.num_layers
    domains = list(runtime.bundle.domains)
    drafters = {d: runtime.drafters[d] for d in domains}
    fix = domains if config.fix_domains is None else list(config.fix_domains)
    unknown = [d for d in fix if d not in domains]
    if unknown:
        raise KnnSsdError(f"--fix-domains names {', '.join(unknown)}, not domains of the bundle",
                          fix=f"choose from {', '.join(domains)}")
    n = config.max_new_tokens
    methods: dict[str, Runner] = {"plain": _ours(model, None, n)}
    methods.update({f"fix-{d}": _ours(model, drafters[d], n) for d in fix})
    has_mix, mix = mix_drafter(runtime)
    if has_mix:
        methods["mix"] = _ours(model, mix, n)
    methods["knn"] = _routed(runtime, n)
    methods["oracle"] = _oracle(model, drafters, n)
    methods.update({name: _ours(model, drafter_from_policy(policy, layers), n) for name, policy in config.policies})
    if config.peers:
        methods["hf-plain"] = _hf(model, n)
    if "hf-prompt-lookup" in config.peers:
        methods["hf-prompt-lookup"] = _hf(model, n, prompt_lookup_num_tokens=config.lookup_tokens)
    if "hf-early-exit" in config.peers:
        methods["hf-early-exit"] = _hf(model, n, assistant_early_exit=config.early_exit_layer or max(1, layers // 2))
    return methods
