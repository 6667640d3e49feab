"""The Ray tasks of calibration. Each loads the model once and does all its work with it.

- `search_domain`: one task per domain; runs the domain's Optuna study to its trial budget (resuming what
  storage already holds). Asks for a GPU where the cluster has them, one CPU otherwise. A worker that dies is
  retried by Ray (`max_retries`); the retry resumes the study, and the trial that was cut short is marked failed.
- `embed_prompts`: the runtime's prompt embedding (final hidden state mean-pooled over the prompt, from the
  prefill) for a chunk of prompts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import ray
import torch

from knnssd.decoding import prefill
from knnssd.entry import quiet_loaders
from knnssd.models import load_model
from knnssd.prompts import encode_prompt
from knnssd.sampling import SamplingConfig
from pipeline.measure import measure_baseline
from pipeline.search import (SearchConfig, best_policy, enqueue_seeds, fail_stale_trials, finished_trials,
                             make_objective, open_study, study_name)

MAX_RETRIES = 3


@dataclass(frozen=True)
class ModelSpec:
    """How workers load the model: name or path, device (None: CUDA when the worker has one), dtype, torch
    threads (None: $KNNSSD_THREADS, else every core of the driver's machine; a task asks Ray for that many CPUs)
    and whether to choose fast kernels (`knnssd.kernels`)."""

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


@ray.remote(max_retries=MAX_RETRIES)
def search_domain(spec: ModelSpec, domain: str, prompts: list[str], config: SearchConfig,
                  storage: str) -> dict[str, Any]:
    """Run (or resume) the domain's study to `config.trials` finished trials; return its policy and figures."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    loaded = spec.load()
    study = open_study(storage, study_name(loaded.model_hash, domain, config, prompts), config)
    study.set_user_attr("worker_pid", os.getpid())
    stale = fail_stale_trials(study)
    enqueue_seeds(study, loaded.num_layers, config)
    done = len(finished_trials(study))
    remaining = max(0, config.trials - done)
    _log(domain, f"study {study.study_name}: {done} trials done{f', {stale} interrupted' if stale else ''}, "
                 f"{remaining} to run on {loaded.device}")
    if remaining:
        ids = [encode_prompt(loaded.tokenizer, text, chat=spec.chat) for text in prompts[: config.prompts_per_trial]]
        baseline = measure_baseline(loaded.model, ids, config.max_new_tokens)
        objective = make_objective(loaded.model, loaded.num_layers, baseline, config,
                                   lambda message: _log(domain, message))
        study.optimize(objective, n_trials=remaining, catch=())
    policy, metrics = best_policy(study, config)
    return {"domain": domain, "policy": policy, "metrics": metrics, "study": study.study_name,
            "model_hash": loaded.model_hash, "trials_run": remaining, "seconds": time.perf_counter() - started,
            "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


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
