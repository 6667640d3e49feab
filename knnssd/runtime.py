"""The runtime: `load_bundle("name@v3")` and routed generation.

    >>> runtime = load_bundle("smollm2-135m@v3")          # or @production, @latest, or a bundle folder
    >>> out = runtime.generate("Translate into French: good morning", max_new_tokens=64)
    >>> out.route.domain, out.route.distance, out.route.fallback, out.text

Per prompt: one prefill (which also yields the prompt embedding: no extra forward pass), a FAISS
nearest-anchor search, then the decoding loop with that domain's draft policy. Needs neither Ray nor Optuna;
MLflow only to fetch a bundle by registry reference (a bundle folder needs none).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from knnssd.bundle import FALLBACK_KEY, Bundle, read_bundle
from knnssd.decoding import GenerationConfig, GenerationResult, begin, decode
from knnssd.drafters import Drafter
from knnssd.errors import KnnSsdError
from knnssd.models import LoadedModel, load_model
from knnssd.policy import drafter_from_policy
from knnssd.prompts import encode_prompt
from knnssd.routing import Route, Router
from knnssd.sampling import SamplingConfig
from knnssd.sources import fetch_bundle
from knnssd.sublayers import model_lock


@dataclass(frozen=True)
class RoutedResult:
    """One routed generation: the text, the loop's result (tokens, stats), where the prompt was routed,
    the policy applied, and the seconds routing took (embedding read-out plus FAISS search)."""

    text: str
    result: GenerationResult
    route: Route
    policy: dict[str, Any]
    routing_seconds: float


class BundleRuntime:
    """A loaded model plus a verified routing bundle; `generate` routes each prompt.

    Safe to call from several threads: generation on one model is serialised by `model_lock(model)` (a
    re-entrant lock per model object), so concurrent calls give exactly the outputs of sequential ones and
    never see another call's skipped sub-layers. For parallel throughput, give each thread its own model."""

    def __init__(self, bundle: Bundle, loaded: LoadedModel) -> None:
        self.bundle = bundle
        self.loaded = loaded
        self.router = Router(index=bundle.index, anchor_domains=bundle.anchor_domains, domains=bundle.domains,
                             fallback_distance=bundle.fallback_distance)
        layers = loaded.num_layers
        self.drafters: dict[str, Drafter | None] = {
            name: drafter_from_policy(policy, layers) for name, policy in bundle.policies.items()}
        self.chat = bool(bundle.manifest.get("prompt_format", {}).get("chat", True))

    def encode(self, prompt: str) -> torch.Tensor:
        """Prompt ids (1, T), formatted as at calibration (chat template or not)."""
        return encode_prompt(self.loaded.tokenizer, prompt, chat=self.chat)

    def generate(self, prompt: str | torch.Tensor, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig()) -> RoutedResult:
        """Route `prompt` (text, or ids (1, T) already formatted) and generate with its domain's policy."""
        config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling)
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        with model_lock(self.loaded.model):  # one generation at a time on this model, whatever the thread
            started = begin(self.loaded.model, ids, config)
            start = time.perf_counter()
            route = self.router.route(started.state.embedding)
            key = FALLBACK_KEY if route.fallback else route.domain
            routing_seconds = time.perf_counter() - start
            result = decode(self.loaded.model, started.state, config, self.drafters[key], started.generator,
                            started.clock)
        text = self.loaded.tokenizer.decode(list(result.token_ids), skip_special_tokens=True)
        return RoutedResult(text=text, result=result, route=route, policy=self.bundle.policies[key],
                            routing_seconds=routing_seconds)


def load_bundle(
    ref: str,
    model: LoadedModel | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_model_mismatch: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    fast_kernels: bool = True,
) -> BundleRuntime:
    """Resolve `ref`, fetch and verify the bundle, load (or take) its model, check the model hash.

    Args:
        ref: "name", "name@latest", "name@v3", "name@<alias>", or a bundle folder.
        model: a model already loaded with `load_model`; default: the bundle's own model id.
        allow_model_mismatch: use the bundle although the model's hash differs from the bundle's.
        threads, fast_kernels: for the model load (see `knnssd.models.load_model`).
    """
    bundle = read_bundle(fetch_bundle(ref, tracking_uri, cache_dir))
    loaded = model if model is not None else load_model(bundle.model_id, device=device, dtype=dtype,
                                                        threads=threads, fast_kernels=fast_kernels)
    if loaded.model_hash != bundle.model_hash and not allow_model_mismatch:
        raise KnnSsdError(
            f"bundle {ref!r} was calibrated on model {bundle.model_id} with hash {bundle.model_hash[:12]}, but the "
            f"model given ({loaded.name}) has hash {loaded.model_hash[:12]}",
            fix="use the bundle's own model, recalibrate for this one, or pass allow_model_mismatch=True "
                "(--allow-model-mismatch) to accept possibly lower speedups",
        )
    hidden = getattr(loaded.model.config, "hidden_size", None)
    if hidden != bundle.index.d:
        raise KnnSsdError(f"bundle {ref!r} routes {bundle.index.d}-dimensional embeddings, but the model given "
                          f"({loaded.name}) has hidden size {hidden}",
                          fix="use the bundle's own model, or recalibrate for this one")
    return BundleRuntime(bundle, loaded)
