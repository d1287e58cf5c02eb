"""The OpenAI API schema the server accepts, as pydantic models, and its error shape.

Requests are validated strictly (a string where a number belongs is an error, not a conversion) and unknown
fields are refused by name, as OpenAI does. Fields OpenAI defines that this engine does not implement are
accepted only at their neutral value (n=1, echo=false, no tools ...) and refused by name otherwise, never
silently ignored.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.sampling import SamplingParams

MAX_LOGPROBS = 20            # OpenAI's limit for top_logprobs (and the completions API's logprobs)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)            # not OpenAI's; vLLM's extension (-1 or 0: off)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None                           # an end-user id for the caller's logs: nothing to do
    ignore_eos: bool = False                          # vLLM's extension: run to max_tokens (benchmarks)

    # (field, its neutral value): anything else is refused by name
    UNSUPPORTED: ClassVar[tuple] = (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                    ("logit_bias", None))

    def refuse_unsupported(self) -> None:
        for name, neutral in self.UNSUPPORTED:
            value = getattr(self, name)
            if value != neutral and not (neutral is None and value == {}):
                raise APIError(400, f"{name}={value!r} is not supported by this server (supported: {name}="
                                    f"{neutral!r}); remove it from the request", param=name,
                               code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def sampling(self, max_tokens: int) -> SamplingParams:
        top_k = self.top_k if self.top_k not in (None, -1, 0) else None
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        # OpenAI's default temperature is 1 (sampling); temperature 0 is greedy
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature, top_k=top_k,
                              top_p=self.top_p, seed=self.seed, max_new_tokens=max_tokens, stop=tuple(stop or ()))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)         # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[tuple] = _Request.UNSUPPORTED + (("echo", False), ("best_of", None), ("suffix", None))

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt holds {len(p)} prompts; this server takes one prompt per request: "
                                    "send one request per prompt (they are batched together)", param="prompt")
            return p[0]
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system"
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    UNSUPPORTED: ClassVar[tuple] = _Request.UNSUPPORTED + tuple((name, None) for name in (
        "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format"))

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse(model: type[_Request], body: Any) -> _Request:
    """The request, or an APIError naming the first field at fault."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "json-or-python")))
        # a union reports the member it tried in the location: keep the field path readable
        param = ".".join(p for p in param.split(".") if p not in ("str", "int", "list[int]", "list[str]",
                                                                   "list[list[int]]", "list[TextPart]", "float"))
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param}", param=param,
                           code="unsupported_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"{param} is required", param=param) from None
        raise APIError(400, f"{param}: {err['msg']} (got {err.get('input')!r:.60})", param=param) from None
