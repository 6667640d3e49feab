"""The OpenAI wire format: request models, their validation, and the bodies the server answers with.

Every refusal is an `ApiError`, answered as OpenAI answers one:
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the status it names.
Options this server does not implement (`n` > 1, `logprobs`, tools, ...) are refused by name, never ignored.
A fault of the server's own is `internal_error()`: a generic 500 that names a request id, never the exception's
text or a traceback (those go to the server's log under that id).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI's own default for /v1/completions; /v1/chat/completions defaults to all the room left in the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4
# torch.Generator.manual_seed takes [-2**63, 2**64 - 1] and folds a negative seed onto 2**64 + seed; 0..2**64 - 1
# is that range with every seed its own stream.
MAX_SEED = 2**64 - 1
TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


class ApiError(Exception):
    """A request refused: HTTP `status`, and the OpenAI error body's message, type, param and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(log: Any, what: str) -> ApiError:
    """The 500 for a fault of the server's own, called in the `except` block that caught it: the exception and its
    traceback are logged on `log` under a new request id, and the body names only that id."""
    request_id = f"req-{uuid.uuid4().hex[:16]}"
    log.exception("request %s: %s", request_id, what)
    return ApiError(500, f"internal server error (request id {request_id}); the server's log holds the details "
                         "under that id", type="server_error", code="internal_error",
                    headers={"X-Request-Id": request_id})


def _accepts(*allowed: Any) -> Any:
    return lambda value: value in allowed


# Options of OpenAI's API this server does not implement: refused by name unless given their neutral value.
UNSUPPORTED = {
    "n": (_accepts(None, 1), "n > 1 (several choices per request) is not supported", "send n=1, or several requests"),
    "best_of": (_accepts(None, 1), "best_of > 1 is not supported", "send best_of=1"),
    "logprobs": (_accepts(None, False), "logprobs are not supported", "leave logprobs out"),
    "top_logprobs": (_accepts(None, 0), "top_logprobs are not supported", "leave top_logprobs out"),
    "echo": (_accepts(None, False), "echo is not supported", "leave echo out"),
    "suffix": (_accepts(None, ""), "suffix (insertion) is not supported", "leave suffix out"),
    "tools": (_accepts(None, []), "tools (function calling) are not supported", "leave tools out"),
    "tool_choice": (_accepts(None, "none"), "tool_choice is not supported", "leave tool_choice out"),
    "functions": (_accepts(None, []), "functions (function calling) are not supported", "leave functions out"),
    "function_call": (_accepts(None, "none"), "function_call is not supported", "leave function_call out"),
    "logit_bias": (_accepts(None, {}), "logit_bias is not supported", "leave logit_bias out"),
    "presence_penalty": (_accepts(None, 0), "presence_penalty is not supported", "leave it out or send 0"),
    "frequency_penalty": (_accepts(None, 0), "frequency_penalty is not supported", "leave it out or send 0"),
    "response_format": (_accepts(None, {"type": "text"}), "response_format other than text is not supported",
                        "leave response_format out"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class Common(BaseModel):
    """The fields both endpoints share. Strict: "10" is not an integer and 1 is not a bool."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {stops!r}",
                           param="stop", code="invalid_value")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Common):
    """POST /v1/completions: `prompt` is one text (sent as is, no chat template) or one list of token ids."""

    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    """POST /v1/chat/completions: `messages` through the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _is_type_name(part: Any) -> bool:
    """Pydantic names the member of a union it tried in an error's location ("str", "list[TextPart]")."""
    return isinstance(part, str) and (part in TYPE_NAMES or "[" in part or part[:1].isupper())


def _param(loc: tuple[Any, ...]) -> str | None:
    """The request field at fault: the location up to the first union member."""
    parts = []
    for part in loc:
        if _is_type_name(part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def parse_request(body: bytes, model_cls: type[Common]) -> Common:
    """Validate a request body into `model_cls`, or raise the ApiError that names the first problem."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(raw).__name__}", code="invalid_json")
    for name, (ok, problem, fix) in UNSUPPORTED.items():
        if name in raw and not ok(raw[name]):
            raise ApiError(400, f"{problem} by this server (got {name}={raw[name]!r}); {fix}", param=name,
                           code="unsupported_parameter")
    try:
        parsed = model_cls.model_validate(raw, strict=True)
    except ValidationError as exc:
        error = max(exc.errors(), key=lambda e: len(e["loc"]))  # the most specific, e.g. inside a union member
        param = _param(tuple(error["loc"]))
        where = ".".join(str(p) for p in error["loc"] if not _is_type_name(p)) or "body"
        if error["type"] == "missing":
            raise ApiError(400, f"missing required field {param!r}", param=param, code="missing_required_field") \
                from None
        raise ApiError(400, f"{where}: {error['msg']} (got {error.get('input')!r})"[:500], param=param,
                       code="invalid_type" if error["type"].endswith("_type") else "invalid_value") from None
    if parsed.seed is not None and not 0 <= parsed.seed <= MAX_SEED:
        raise ApiError(400, f"seed must be an integer from 0 to 2**64 - 1 ({MAX_SEED}), got {parsed.seed}; send a "
                            "seed in that range, or leave it out", param="seed", code="invalid_value")
    return parsed


@dataclass(frozen=True)
class Answer:
    """What the engine hands back for one finished request."""

    text: str
    finish_reason: str  # OpenAI's: "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    knnssd: dict[str, Any]

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Envelope:
    """The fields every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool

    @classmethod
    def new(cls, model: str, chat: bool) -> "Envelope":
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model, chat=chat)

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self, answer: Answer) -> dict[str, Any]:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "finish_reason": answer.finish_reason, "logprobs": None}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": answer.usage(), "knnssd": answer.knnssd}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk: a text delta, or (with `finish_reason`) the last one, carrying `extra`."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            body = self._head("text_completion")
        return {**body, "choices": [choice], **(extra or {})}

    def usage_chunk(self, answer: Answer) -> dict[str, Any]:
        """OpenAI's last chunk under stream_options.include_usage: no choices, the usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": answer.usage()}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
