"""OpenAI request bodies (pydantic) and OpenAI-style error bodies.

Every mistake in a request is an `APIError` whose body names the field:
    {"error": {"message": "max_tokens: ...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
Fields the OpenAI API has but this server does not implement are accepted at their neutral value (logprobs null,
presence_penalty 0, ...) and refused otherwise; fields no schema here knows are refused (a typo such as "max_token"
would otherwise silently use the default).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered as an OpenAI error body with HTTP `status`."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Number = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, description="extension; -1 or 0 = off")
    seed: StrictInt | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: StrictStr | list[StrictStr | StrictInt] | None = None
    stop_token_ids: list[StrictInt] | None = None  # extension (vLLM's)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    user: StrictStr | None = None
    # OpenAI fields accepted at their neutral value only
    logprobs: StrictBool | StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    # extensions
    return_spec_stats: StrictBool = False  # per-request speculative statistics ("spec_stats" in the response)
    return_token_ids: StrictBool = False  # the generated token ids ("token_ids" in each choice)

    def check_supported(self) -> None:
        """Refuse what the schema admits but the server does not do (n > 1, logprobs, penalties...)."""
        if self.n != 1:
            raise APIError(f"n: only n = 1 is supported, got {self.n}", param="n")
        neutral = {"logprobs": (None, False, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                   "logit_bias": (None, {})}
        for name, ok in neutral.items():
            value = getattr(self, name)
            if not any(value == v and type(value) is type(v) or value is v for v in ok):
                raise APIError(f"{name}: not supported by this server (got {value!r})", param=name)
        if self.stream_options is not None:
            if not self.stream:
                raise APIError("stream_options: only allowed with stream true", param="stream_options")
            unknown = set(self.stream_options) - {"include_usage"}
            if unknown or not isinstance(self.stream_options.get("include_usage", False), bool):
                raise APIError("stream_options: expected {\"include_usage\": true|false}", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(f"stop: at most {MAX_STOP_STRINGS} entries, got {len(stops)}", param="stop")
        for s in stops:
            if isinstance(s, str) and not 0 < len(s) <= MAX_STOP_CHARS:
                raise APIError(f"stop: stop strings must have 1 to {MAX_STOP_CHARS} characters", param="stop")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if isinstance(s, str)]

    def stop_ids(self, vocab_size: int) -> list[int]:
        """Token ids that end the generation: int entries of `stop` and stop_token_ids (each checked)."""
        stops = [] if isinstance(self.stop, str) else [s for s in (self.stop or []) if isinstance(s, int)]
        for field, ids in (("stop", stops), ("stop_token_ids", self.stop_token_ids or [])):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise APIError(f"{field}: token ids must lie in [0, {vocab_size}), got {bad[0]}", param=field)
        return stops + list(self.stop_token_ids or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage", False))


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, ok in (("echo", False), ("suffix", None)):
            if getattr(self, name) != ok:
                raise APIError(f"{name}: not supported by this server", param=name)
        if self.best_of not in (None, 1):
            raise APIError(f"best_of: only best_of = 1 is supported, got {self.best_of}", param="best_of")

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); a batch of several prompts is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(f"prompt: one prompt per request (got a list of {len(p)})", param="prompt")
            p = p[0]
        if len(p) == 0:
            raise APIError("prompt: must not be empty", param="prompt")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError("max_completion_tokens: differs from max_tokens (give one of them)",
                           param="max_completion_tokens")
        if self.top_logprobs not in (None, 0):
            raise APIError("top_logprobs: not supported by this server", param="top_logprobs")
        if self.response_format not in (None, {"type": "text"}):
            raise APIError("response_format: only {\"type\": \"text\"} is supported", param="response_format")
        if self.tools:
            raise APIError("tools: tool calls are not supported by this server", param="tools")
        if self.tool_choice not in (None, "none"):
            raise APIError("tool_choice: tool calls are not supported by this server", param="tool_choice")

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as an APIError naming its field ("messages.0.role", "max_tokens")."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(f"{param}: unknown field (not part of this request's schema)", param=param)
    if err.get("type") == "missing":
        return APIError(f"{param}: required", param=param)
    msg = err.get("msg", "invalid value")
    return APIError(f"{param}: {msg}" if param else msg, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before", "union", "none",
              "list[int]", "list[str]", "TextPart", "list[TextPart]"}


def parse(model: type[_Request], body: Any) -> _Request:
    """Validate a decoded JSON body against `model`; APIError (400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    req.check_supported()
    return req
