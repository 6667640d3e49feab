"""The Ray tasks of calibration. Each loads the model once and does all its work with it.

- `identify_model`: the model's hash and layer count (what names its studies), and this node's step-cost table
  timed once (`pipeline.costs`) so later tasks on the node read it.
- `search_worker`: one or more per domain; runs trials of the domain's Optuna study (prepared by the driver)
  until it holds its budget of completed trials. Asks for a GPU where the cluster has them, else as many CPUs as
  it replays on torch threads (`search_threads`, default 1, on a single CPU node; its trials priced for the
  decoding thread count). A worker that dies is retried by Ray (`max_retries`); its cut-short trial is marked
  failed by the driver on the next run.
- `confirm_domain`: the study's top candidates re-measured in wall clock on more prompts, in rounds
  until a difference is larger than its spread (`pipeline.confirm`), and the choice.
- `validate_domain`: every policy on one domain's held-out prompts, wall clock and predicted.
The search, confirm and validate tasks receive the stores their suffix-tree policies may draft from
(`pipeline.stores.DomainStore`, by value) and the prompts' texts: a store-drafting policy measured on a
calibration prompt drafts from the store without that prompt's output (`pipeline.drafting`).
- `embed_prompts`: the runtime's prompt embedding (final hidden state mean-pooled over the prompt, from the
  prefill) for a chunk of prompts.
- `build_store`: a domain's store, the model's plain greedy outputs on its calibration prompts, decoded in
  batches by the engine's loop (`pipeline.store_decoding`), and the loop's top successors after each output
  token: the domain's warm table. The search worker traces its trials from these outputs (`search_workload`):
  every calibration prompt in the store (up to `prompts_per_trial`) is scored, with no decoding in the search.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import ray
import torch

from knnssd.engine.decoding import prefill
from knnssd.cli.entry import quiet_loaders
from knnssd.engine.models import LoadedModel, load_model
from knnssd.engine.policy import describe_policy
from knnssd.engine.prompts import encode_prompt
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.threads import use_threads
from pipeline.costs import StepCosts, step_costs_for, table_key
from pipeline.drafting import PolicyDrafters
from pipeline.measure import Measured, measure_policies
from pipeline.scoring import Workload, build_workload, score_policy, workload_of
from pipeline.confirm import choose_policy, confirm, pooled_figures, top_candidates
from pipeline.search import completed_trials, make_objective, open_worker_study, run_worker
from pipeline.space import SearchConfig, policy_skip_ratio
from pipeline.stores import DomainStore
from pipeline.traces import store_traces, trace_prompt

MAX_RETRIES = 3


@dataclass(frozen=True)
class ModelSpec:
    """How workers load the model: name or path, device (None: CUDA when the worker has one), dtype, torch
    threads (None: $KNNSSD_THREADS, else every core of the driver's machine; a task asks Ray for that many CPUs)
    and whether to choose fast kernels (`knnssd.engine.kernels`)."""

    name: str
    device: str | None = None
    dtype: str | None = None
    chat: bool = True
    threads: int | None = None
    fast_kernels: bool = True

    def load(self) -> Any:
        """The model, in a worker: no per-tensor loading bars in the job's log."""
        quiet_loaders()
        return load_model(self.name, device=self.device, dtype=self.dtype, threads=self.threads,
                          fast_kernels=self.fast_kernels)


def _log(domain: str, message: str) -> None:
    print(f"[{domain}] {message}", flush=True)


def worker_costs(loaded: LoadedModel, costs_dir: str, domain: str) -> StepCosts:
    return step_costs_for(loaded.model, Path(costs_dir), table_key(loaded), lambda m: _log(domain, m))


def where(loaded: LoadedModel) -> dict[str, Any]:
    return {"device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def time_and_predict(loaded: LoadedModel, policies: dict[str, dict[str, Any]], ids: list[torch.Tensor],
                     max_new_tokens: int, costs: StepCosts, seed: int, texts: list[str],
                     stores: dict[str, DomainStore | None]) -> dict[str, dict[str, float]]:
    """Per policy name: its wall-clock figures against plain decoding (`measure_policies`) and, in
    "predicted_speedup", its replayed and priced speedup on the same prompts (of `texts`), traced by the same
    plain runs; `stores`: policy name -> the store it drafts from."""
    drafters = PolicyDrafters(loaded.num_layers)
    measured = measure_policies(loaded.model, policies, ids, max_new_tokens, loaded.num_layers, seed=seed,
                                stores=stores, texts=texts, drafters=drafters)
    workload = workload_of(loaded.model, measured.traces, texts)
    return {name: {**measured.policies[name].to_dict(), "predicted_speedup": score_policy(
        loaded.model, policy, loaded.num_layers, workload, costs, stores.get(name), drafters).predicted_speedup}
        for name, policy in policies.items()}


@ray.remote(max_retries=MAX_RETRIES)
def identify_model(spec: ModelSpec, costs_dir: str) -> dict[str, Any]:
    """The model hash and layer count, and this node's step costs (timed now unless already there)."""
    loaded = spec.load()
    costs = worker_costs(loaded, costs_dir, "model")
    return {"model_hash": loaded.model_hash, "num_layers": loaded.num_layers, "costs": costs.to_dict(),
            **where(loaded)}


def search_workload(model: Any, encode: Callable[[str], torch.Tensor], prompts: list[str], config: SearchConfig,
                    store: DomainStore | None, log: Callable[[str], None]) -> Workload:
    """What a worker's trials score on: each calibration prompt (of `prompts`, in order) with a store output, up
    to `config.prompts_per_trial` of them, traced from the store with no decoding (`pipeline.traces.store_traces`:
    the store's outputs are plain decoding's); without a store (or none of the prompts in it), the first
    `prompts_per_trial` prompts decoded plainly (`build_workload`). A prompt whose store output is too short to
    be its trace (a store budget below `config.max_new_tokens`) is decoded too. Either way each prompt's
    full-model cache is one forward (`workload_of`). `encode(text)`: the prompt's ids (1, T), as the store's."""
    index = {} if store is None else {text: i for i, text in enumerate(store.prompts)}
    stored = [text for text in prompts if text in index][: config.prompts_per_trial]
    texts = stored or prompts[: config.prompts_per_trial]
    ids = [encode(text) for text in texts]
    if not stored:
        log(f"search: decoding {len(texts)} prompts plainly for the trials (no store outputs to trace)")
        return build_workload(model, ids, config.max_new_tokens, texts)
    rows = None if store.successors is None else [store.successors[index[text]] for text in texts]
    traces = store_traces(model, ids, [store.outputs[index[text]] for text in texts], rows,
                          config.max_new_tokens)
    short = [i for i, trace in enumerate(traces) if trace is None]
    if short:
        log(f"search: {len(short)} store outputs are shorter than --max-new-tokens {config.max_new_tokens} "
            "without an EOS; decoding those prompts")
    traces = [trace_prompt(model, ids[i], config.max_new_tokens) if trace is None else trace
              for i, trace in enumerate(traces)]
    log(f"search: trials score on {len(texts)} calibration prompts, {len(texts) - len(short)} traced from the store")
    return workload_of(model, traces, texts)


@ray.remote(max_retries=MAX_RETRIES)
def search_worker(spec: ModelSpec, domain: str, prompts: list[str], config: SearchConfig, storage: str,
                  study: str, worker: int, costs_dir: str, store: DomainStore | None = None,
                  replay_threads: int | None = None) -> dict[str, Any]:
    """Run trials of `study` (prepared by the driver) until it holds `config.trials` completed ones; `store`:
    the domain's store (None: none, and no trial drafts from one). The model loads as the runtime's (`spec`'s
    threads and kernels), so the trials are priced by the step-cost table of the decoding thread count; the
    replay then runs on `replay_threads` torch threads (None: the spec's), as many as the task holds CPUs.
    Replay's layer-skip predictions use the library's products, as they always have (`pipeline.replay`), which
    may round differently on another thread count: that moves a near-tie prediction only, as replay's library
    path already can. Suffix trees and prompt lookup replay no model pass at all."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    loaded = spec.load()
    costs = worker_costs(loaded, costs_dir, domain)
    if replay_threads is not None:
        use_threads(replay_threads)
    handle = open_worker_study(storage, study, config, worker)
    handle.set_user_attr(f"worker_pid.{worker}", os.getpid())
    ran = 0
    if len(completed_trials(handle)) < config.trials:
        workload = search_workload(loaded.model, lambda text: encode_prompt(loaded.tokenizer, text, chat=spec.chat),
                                   prompts, config, store, lambda message: _log(domain, message))
        handle.set_user_attr("prompts_scored", len(workload.traces))
        objective = make_objective(loaded.model, loaded.num_layers, workload, costs, config,
                                   lambda message: _log(domain, message), store)
        ran = run_worker(handle, objective, config)
    return {"domain": domain, "worker": worker, "trials_run": ran, "seconds": time.perf_counter() - started}


@ray.remote(max_retries=MAX_RETRIES)
def confirm_domain(spec: ModelSpec, domain: str, prompts: list[str], config: SearchConfig, storage: str,
                   study: str, costs_dir: str, store: DomainStore | None = None) -> dict[str, Any]:
    """The study's top candidates timed against plain decoding on up to `config.confirm_prompts` prompts (in wall
    clock: fewer than a trial may score by replay), in up to `config.confirm_rounds` rounds, each also predicted
    on them; the choice as `pipeline.confirm` makes it. `store`: the domain's store, as the search had it."""
    started = time.perf_counter()
    loaded = spec.load()
    costs = worker_costs(loaded, costs_dir, domain)
    handle = open_worker_study(storage, study, config, worker=0)
    trials = completed_trials(handle)
    chosen = top_candidates(handle, config.confirm_candidates)
    candidates, decision = [], None
    if chosen:
        texts = prompts[: config.confirm_prompts]
        ids = [encode_prompt(loaded.tokenizer, text, chat=spec.chat) for text in texts]
        policies = {str(t.number): t.user_attrs["policy"] for t in chosen}  # best predicted first
        drafters = PolicyDrafters(loaded.num_layers)

        def measure_round(index: int) -> Measured:
            _log(domain, f"confirming {len(chosen)} candidates on {len(ids)} prompts in wall clock, round {index + 1}")
            return measure_policies(loaded.model, policies, ids, config.max_new_tokens, loaded.num_layers,
                                    seed=config.seed + index, stores={name: store for name in policies}, texts=texts,
                                    drafters=drafters, successors=None if index == 0 else False)  # round 0's replayed

        decision, rounds = confirm(list(policies), measure_round, config.confirm_rounds, seed=config.seed)
        figures = pooled_figures(rounds)
        workload = workload_of(loaded.model, rounds[0].traces, texts)
        for trial in chosen:
            policy = trial.user_attrs["policy"]
            predicted = score_policy(loaded.model, policy, loaded.num_layers, workload, costs, store,
                                     drafters).predicted_speedup
            confirmed = figures[str(trial.number)]
            candidates.append({"trial": trial.number, "policy": policy, "search_predicted": float(trial.value),
                               "predicted": predicted, "confirmed": confirmed,
                               "skip_ratio": policy_skip_ratio(policy, loaded.num_layers) or 0.0})
            _log(domain, f"  trial {trial.number}: {describe_policy(policy)}: predicted {predicted:.3f}, "
                         f"wall clock {confirmed['speedup']:.3f}")
        _log(domain, f"chose trial {decision.chosen}: {decision.reason}")
    policy, metrics = choose_policy(candidates, len(trials), config.min_speedup, decision)
    return {"domain": domain, "policy": policy, "metrics": metrics, "candidates": candidates, "study": study,
            "model_hash": loaded.model_hash, "seconds": time.perf_counter() - started, **where(loaded)}


@ray.remote(max_retries=MAX_RETRIES)
def validate_domain(spec: ModelSpec, domain: str, prompts: list[str], policies: dict[str, dict[str, Any]],
                    max_new_tokens: int, costs_dir: str, seed: int = 0,
                    stores: dict[str, DomainStore | None] | None = None) -> dict[str, Any]:
    """Every policy (name -> policy) on the domain's held-out prompts: wall clock against plain decoding, and
    predicted by replay on the same prompts. `stores`: policy name -> the store it drafts from (its domain's;
    the whole store, as the bundle's runtime drafts: held-out prompts are in no store)."""
    loaded = spec.load()
    costs = worker_costs(loaded, costs_dir, domain)
    ids = [encode_prompt(loaded.tokenizer, text, chat=spec.chat) for text in prompts]
    return {"domain": domain, "prompts": len(ids),
            "policies": time_and_predict(loaded, policies, ids, max_new_tokens, costs, seed, list(prompts),
                                         stores or {})}


@ray.remote(max_retries=MAX_RETRIES)
def embed_prompts(spec: ModelSpec, prompts: list[str]) -> np.ndarray:
    """(len(prompts), hidden) float32 prompt embeddings, exactly as the runtime computes them."""
    loaded = spec.load()
    rows = []
    for text in prompts:
        ids = encode_prompt(loaded.tokenizer, text, chat=spec.chat).to(loaded.device)
        state = prefill(loaded.model, ids, SamplingConfig(), None, lambda: 0.0)
        rows.append(state.embedding.cpu().numpy())
    return np.stack(rows).astype(np.float32)


@ray.remote(max_retries=MAX_RETRIES)
def build_store(spec: ModelSpec, domain: str, prompts: list[str], max_new_tokens: int,
                batch_size: int) -> DomainStore:
    """The domain's store: the model's plain greedy continuation of each prompt, at most `max_new_tokens` each,
    decoded by the engine's loop `batch_size` prompts at a time, with the loop's top successors after each output
    token (`pipeline.store_decoding`): plain decoding's outputs exactly, so the search traces its trials from
    them (`search_workload`)."""
    from pipeline.store_decoding import decode_store
    from pipeline.successors import model_vocab

    loaded = spec.load()
    ids = [encode_prompt(loaded.tokenizer, text, chat=spec.chat) for text in prompts]
    invariant = loaded.kernels is not None and loaded.kernels.batch_invariant
    if not invariant:
        _log(domain, "store: the model's kernels are not batch-invariant here: decoding one prompt at a time")
    decoded = decode_store(loaded.model, ids, max_new_tokens, batch_size, invariant,
                           progress=lambda done, total: _log(domain, f"store: {done}/{total} prompts"))
    return DomainStore(domain=domain, prompts=tuple(prompts), outputs=decoded.outputs,
                       successors=decoded.successors, vocab=model_vocab(loaded.model), embeddings=decoded.embeddings)
