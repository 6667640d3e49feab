"""Text in, text and figures out: the library call behind `knnssd generate`."""

from __future__ import annotations

from dataclasses import dataclass

from knnssd.decoding import GenerationConfig, GenerationResult, check_prompt, generate
from knnssd.errors import KnnSsdError
from knnssd.drafters import DraftConfig, Drafter, LayerSkipDrafter
from knnssd.models import LoadedModel, load_model
from knnssd.prompts import encode_prompt
from knnssd.sampling import SamplingConfig
from knnssd.skipset import SkipSet


@dataclass(frozen=True)
class GenerateRequest:
    """Everything `knnssd generate` takes; `skip_set` is JSON or a file path, None for plain decoding."""

    model: str
    prompt: str
    chat: bool = False
    max_new_tokens: int = 128
    skip_set: str | None = None
    threshold: float = 0.8
    max_draft_tokens: int = 12
    adaptive: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    compare_ar: bool = False
    device: str | None = None
    dtype: str | None = None


def plain_drafter_description() -> dict[str, object]:
    return {"kind": "none"}


def warm_up(loaded: LoadedModel, prompt_ids: object) -> None:
    """One tiny generation, so that one-time costs do not land on the first timed run."""
    generate(loaded.model, prompt_ids[:, :8], GenerationConfig(max_new_tokens=2, eos_token_ids=()))


def result_to_dict(loaded: LoadedModel, result: GenerationResult) -> dict[str, object]:
    return {
        "text": loaded.tokenizer.decode(list(result.token_ids), skip_special_tokens=True),
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "stats": result.stats.to_dict(),
    }


def generate_text(request: GenerateRequest) -> dict[str, object]:
    """Run one request; the returned dict is what `--json` prints. Input is checked before the model loads."""
    if not request.prompt.strip():
        raise KnnSsdError("the prompt is empty", fix="give a prompt with some text, e.g. --prompt 'Hello'")
    sampling = SamplingConfig(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                              seed=request.seed)
    config = GenerationConfig(max_new_tokens=request.max_new_tokens, sampling=sampling)
    drafter_config = DraftConfig(threshold=request.threshold, max_draft_tokens=request.max_draft_tokens,
                                 adaptive=request.adaptive)
    skip_set = SkipSet.parse(request.skip_set) if request.skip_set is not None else None
    loaded = load_model(request.model, device=request.device, dtype=request.dtype)
    drafter: Drafter | None = None
    if skip_set is not None:
        drafter = LayerSkipDrafter(skip_set.validate(loaded.num_layers), drafter_config)
    prompt_ids = encode_prompt(loaded.tokenizer, request.prompt, chat=request.chat)
    check_prompt(loaded.model, prompt_ids, config.max_new_tokens)
    warm_up(loaded, prompt_ids)
    report: dict[str, object] = {
        "model": loaded.name,
        "model_hash": loaded.model_hash,
        "prompt_tokens": int(prompt_ids.shape[1]),
        "drafter": drafter.describe() if drafter is not None else plain_drafter_description(),
    }
    if request.compare_ar:
        plain = generate(loaded.model, prompt_ids, config)
    result = generate(loaded.model, prompt_ids, config, drafter)
    report.update(result_to_dict(loaded, result))
    if request.compare_ar:
        report["ar_token_ids"] = list(plain.token_ids)
        report["ar_tokens_per_second"] = plain.stats.tokens_per_second
        report["speedup"] = plain.stats.total_seconds / result.stats.total_seconds
        report["identical_to_ar"] = plain.token_ids == result.token_ids
    return report
