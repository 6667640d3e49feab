"""One request's work for the engine: its prompt ids, token budget, sampling and stop strings, checked against
the model (context length, vocabulary, chat template) so that a bad request is refused with the field it got
wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError, TemplateSyntaxError

from knnssd.errors import KnnSsdError
from knnssd.engine.prompts import encode_prompt
from knnssd.bundle.runtime import BundleRuntime
from knnssd.engine.sampling import SamplingConfig
from knnssd.serve.protocol import DEFAULT_COMPLETION_MAX_TOKENS, ApiError, ChatRequest, Common, CompletionRequest


@dataclass(frozen=True)
class Work:
    """What to generate: prompt ids (1, T), at most `max_tokens` new tokens, how to choose them, stop strings."""

    ids: torch.Tensor
    max_tokens: int
    sampling: SamplingConfig
    stops: tuple[str, ...] = ()


def make_work(parsed: Common, runtime: BundleRuntime, chat: bool) -> Work:
    """Prompt ids, token budget, sampling and stop strings of one request, checked against the model."""
    tokenizer = runtime.loaded.tokenizer
    param = "messages" if chat else "prompt"
    try:
        if isinstance(parsed, ChatRequest):
            ids = runtime.encode_chat([{"role": m.role, "content": m.text()} for m in parsed.messages])
        else:
            ids = prompt_ids(parsed, tokenizer, runtime.loaded.model.config.vocab_size)
        sampling = SamplingConfig(temperature=parsed.temperature, top_p=parsed.top_p, seed=parsed.seed)
    except KnnSsdError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None
    except TemplateSyntaxError:
        raise  # the model's template itself is broken: a fault of the server's (a 500), not of the request
    except TemplateError as exc:  # the template refused these messages (a system role, roles that do not alternate)
        raise ApiError(400, f"the model's chat template rejected the messages: {str(exc.message or exc)[:300]}; "
                            "change the messages to what this model's template takes", param="messages",
                       code="invalid_value") from None
    length, context = int(ids.shape[1]), runtime.context_length
    if context is not None and length >= context:
        raise ApiError(400, f"the prompt has {length} tokens, but the model's context is {context} tokens (prompt "
                            "and new tokens together); shorten the prompt", param=param,
                       code="context_length_exceeded")
    requested = parsed.max_completion_tokens if isinstance(parsed, ChatRequest) else None
    requested = requested if requested is not None else parsed.max_tokens
    if requested is None:
        room = (context - length) if context is not None else DEFAULT_COMPLETION_MAX_TOKENS
        requested = room if chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
    if requested < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens",
                       code="invalid_value")
    if context is not None and length + requested > context:
        raise ApiError(400, f"max_tokens ({requested}) plus the prompt's {length} tokens exceed the model's context "
                            f"of {context} tokens; ask for at most {context - length} tokens",
                       param="max_tokens", code="context_length_exceeded")
    return Work(ids=ids, max_tokens=requested, sampling=sampling, stops=parsed.stop_strings())


def prompt_ids(parsed: CompletionRequest, tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(1, T) ids of a completion's prompt: text as is (no chat template, as OpenAI's completions take it), or
    token ids."""
    prompt = parsed.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 1:
            raise ApiError(400, f"prompt holds {len(prompt)} texts; this server takes one prompt per request",
                           param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, chat=False)
    if not prompt or any(not 0 <= token < vocab_size for token in prompt):
        raise ApiError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab_size})",
                       param="prompt", code="invalid_value")
    return torch.tensor([prompt], dtype=torch.long)
