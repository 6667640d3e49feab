"""`knnssd generate` as a library call: a `GenerateRequest` (text and flags) in, the report dict out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knnssd.engine.decoding import GenerationConfig, GenerationResult, check_prompt, generate, warm_up
from knnssd.engine.drafters import LayerSkipConfig, Drafter, LayerSkipDrafter
from knnssd.errors import KnnSsdError
from knnssd.engine.models import LoadedModel, load_model
from knnssd.engine.policy import drafter_from_policy, parse_policy, policy_of
from knnssd.engine.prompts import encode_prompt
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.skipset import SkipSet


@dataclass(frozen=True)
class GenerateRequest:
    """Everything `knnssd generate` takes; `skip_set` (layer skipping) or `policy` (any draft policy, see
    knnssd.engine.policy) is JSON or a file path; neither means plain decoding."""

    model: str | None
    prompt: str
    chat: bool = False
    max_new_tokens: int = 128
    skip_set: str | None = None
    policy: str | None = None
    threshold: float = LayerSkipConfig.threshold
    max_draft_tokens: int = LayerSkipConfig.max_draft_tokens
    adaptive: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    compare_ar: bool = False
    device: str | None = None
    dtype: str | None = None
    bundle: str | None = None
    tracking_uri: str | None = None
    allow_model_mismatch: bool = False
    threads: int | None = None
    fast_kernels: bool = True
    trusted_keys: tuple[str, ...] | None = None  # with --bundle; None: $KNNSSD_TRUSTED_KEYS (knnssd.bundle.signing)


def result_to_dict(loaded: LoadedModel, result: GenerationResult) -> dict[str, object]:
    return {
        "text": loaded.tokenizer.decode(list(result.token_ids), skip_special_tokens=True),
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "stats": result.stats.to_dict(),
    }


def answer_request(request: GenerateRequest) -> dict[str, object]:
    """Run one request; the returned dict is what `--json` prints. Input is checked before the model loads."""
    if not request.prompt.strip():
        raise KnnSsdError("the prompt is empty", fix="give a prompt with some text, e.g. --prompt 'Hello'")
    chosen = [flag for flag, value in (("--bundle", request.bundle), ("--skip-set", request.skip_set),
                                       ("--policy", request.policy)) if value is not None]
    if len(chosen) > 1:
        raise KnnSsdError(f"{' and '.join(chosen)} given together",
                          fix="each chooses the drafter: give one (--bundle routes, --policy or --skip-set fix it)")
    if request.bundle is None and not request.model:
        raise KnnSsdError("no model given", fix="pass --model NAME_OR_PATH, or --bundle NAME@vN")
    sampling = SamplingConfig(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                              seed=request.seed)
    config = GenerationConfig(max_new_tokens=request.max_new_tokens, sampling=sampling)
    if request.bundle is not None:
        return _generate_routed(request, config)
    drafter_config = LayerSkipConfig(threshold=request.threshold, max_draft_tokens=request.max_draft_tokens,
                                 adaptive=request.adaptive)
    skip_set = SkipSet.parse(request.skip_set) if request.skip_set is not None else None
    policy = parse_policy(request.policy) if request.policy is not None else None
    loaded = load_model(request.model, device=request.device, dtype=request.dtype, threads=request.threads,
                        fast_kernels=request.fast_kernels)
    drafter: Drafter | None = None
    if skip_set is not None:
        drafter = LayerSkipDrafter(skip_set.validate(loaded.num_layers), drafter_config)
    if policy is not None:
        drafter = drafter_from_policy(policy, loaded.num_layers)
    prompt_ids = encode_prompt(loaded.tokenizer, request.prompt, chat=request.chat)
    check_prompt(loaded.model, prompt_ids, config.max_new_tokens)
    warm_up(loaded.model, prompt_ids)
    report = _header(loaded, prompt_ids, policy_of(drafter))
    plain = generate(loaded.model, prompt_ids, config) if request.compare_ar else None
    result = generate(loaded.model, prompt_ids, config, drafter)
    report.update(result_to_dict(loaded, result))
    if plain is not None:
        report.update(_comparison(plain, result))
    return report


def _header(loaded: LoadedModel, prompt_ids: torch.Tensor, policy: dict[str, object]) -> dict[str, object]:
    return {"model": loaded.name, "model_hash": loaded.model_hash, "prompt_tokens": int(prompt_ids.shape[1]),
            "drafter": policy, "threads": loaded.threads,
            "kernels": loaded.kernels.describe() if loaded.kernels else "not chosen"}


def _comparison(plain: GenerationResult, result: GenerationResult) -> dict[str, object]:
    return {"ar_token_ids": list(plain.token_ids), "ar_tokens_per_second": plain.stats.tokens_per_second,
            "speedup": plain.stats.total_seconds / result.stats.total_seconds,
            "identical_to_ar": plain.token_ids == result.token_ids}


def _generate_routed(request: GenerateRequest, config: GenerationConfig) -> dict[str, object]:
    """`--bundle`: the bundle's model (or --model, hash-checked), its prompt format, routed per prompt."""
    from knnssd.bundle.runtime import load_bundle

    model = load_model(request.model, device=request.device, dtype=request.dtype, threads=request.threads,
                       fast_kernels=request.fast_kernels) if request.model else None
    runtime = load_bundle(request.bundle, model=model, tracking_uri=request.tracking_uri,
                          allow_model_mismatch=request.allow_model_mismatch, device=request.device,
                          dtype=request.dtype, threads=request.threads, fast_kernels=request.fast_kernels,
                          trusted_keys=request.trusted_keys)
    loaded = runtime.loaded
    prompt_ids = runtime.encode(request.prompt)
    check_prompt(loaded.model, prompt_ids, config.max_new_tokens)
    warm_up(loaded.model, prompt_ids)
    plain = generate(loaded.model, prompt_ids, config) if request.compare_ar else None
    routed = runtime.generate(prompt_ids, max_new_tokens=config.max_new_tokens, sampling=config.sampling)
    report = _header(loaded, prompt_ids, routed.policy)
    report.update(result_to_dict(loaded, routed.result))
    report.update({"bundle": request.bundle, "domain": routed.route.domain, "distance": routed.route.distance,
                   "fallback": routed.route.fallback, "routing_seconds": routed.routing_seconds,
                   "bundle_signature": runtime.bundle.authenticity.describe()})
    if plain is not None:
        report.update(_comparison(plain, routed.result))
    return report
