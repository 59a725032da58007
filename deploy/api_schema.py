"""What a client may send to `deploy serve`, validated before anything is queued.

Every field is declared with its type and bounds (pydantic, strict: no "1" for 1, no true for 1), and
any field not declared here is refused, so that nothing a client asks for is silently ignored. A
refusal is an ApiError(400) whose `param` names the field ("messages.0.content").
"""
from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 4            # as OpenAI
MAX_STOP_CHARS = 200
MAX_SEED = 2**63 - 1    # torch.manual_seed takes at most 64 bits; OpenAI's seed is an int64
MIN_TEMPERATURE = 0.01  # below it a float32 softmax overflows (1e-300 -> inf -> NaN): send 0 for greedy


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Message(_Strict):
    role: str
    content: str
    input: str | None = None      # zhllama: the Alpaca "input" of a user turn


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = 1
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    top_logprobs: None = None     # not computed by this server: any value is refused
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None       # an opaque end-user id (OpenAI's abuse monitoring); nothing to do with it
    # zhllama extensions
    preset: str | None = None
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, ge=0.5, le=2)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or between {MIN_TEMPERATURE} and 2")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else v
        if v is not None and not (isinstance(items, list) and 1 <= len(items) <= MAX_STOP and all(
                isinstance(x, str) and 1 <= len(x) <= MAX_STOP_CHARS for x in items)):
            raise ValueError(f"must be a string or a list of 1 to {MAX_STOP} strings, each 1 to {MAX_STOP_CHARS} "
                             "characters")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v:
            raise ValueError("is not supported by this server (use repetition_penalty)")
        return v

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v:
            raise ValueError("is not supported by this server")
        return v


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    logprobs: int | None = None
    echo: bool = False
    best_of: int = 1

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v is not None:
            raise ValueError("is not supported by this server")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v != 1:
            raise ValueError("only best_of=1 is supported")
        return v


def _param(loc) -> str:
    # pydantic adds the tried member of a union ("constrained-str", "list[str]"): not a field
    return ".".join(str(p) for p in loc if isinstance(p, int) or p.isidentifier())


def parse(raw: bytes, chat: bool) -> ChatRequest | CompletionRequest:
    """The request from its raw JSON body, or ApiError(400) naming the first bad field."""
    cls = ChatRequest if chat else CompletionRequest
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        kind, loc, msg = first["type"], first["loc"], first["msg"]
        if kind == "json_invalid":   # bad JSON, bad UTF-8, lone surrogates, nesting past pydantic's limit
            raise ApiError(400, f"body is not JSON: {msg}") from None
        if not loc:
            raise ApiError(400, "body must be a JSON object") from None
        if loc[0] == "top_logprobs":
            raise ApiError(400, "top_logprobs: is not supported by this server", "top_logprobs") from None
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise ApiError(400, f"{_param(loc)}: {msg}", _param(loc)) from None


def sampling(req: _Common, max_tokens_cap: int):
    """Decoding settings: the preset (default "paper"), overridden field by field by the request.
    temperature 0 is greedy with exactly the "greedy" preset's settings (a request's explicit
    repetition_penalty still applies)."""
    from deploy.backends import Sampling
    from sft.generate import PRESETS

    preset = req.preset if req.preset is not None else "paper"
    if preset not in PRESETS:
        raise ApiError(400, f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", "preset")
    if req.temperature == 0:
        preset = "greedy"
    p = PRESETS[preset]
    mt = getattr(req, "max_completion_tokens", None) or req.max_tokens or max_tokens_cap
    if mt > max_tokens_cap:
        raise ApiError(400, f"max_tokens {mt} is over this server's cap of {max_tokens_cap}", "max_tokens")
    do_sample = p["do_sample"] if req.temperature is None else req.temperature > 0
    return Sampling(max_tokens=mt, do_sample=do_sample,
                    temperature=req.temperature or p.get("temperature", 1.0),
                    top_p=req.top_p if req.top_p is not None else p.get("top_p", 1.0),
                    top_k=req.top_k if req.top_k is not None else p.get("top_k", 0),
                    repetition_penalty=(req.repetition_penalty if req.repetition_penalty is not None
                                        else p.get("repetition_penalty", 1.0)),
                    seed=req.seed)
