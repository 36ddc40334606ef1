"""The OpenAI chat-completions wire format as `tinyvlm serve` speaks it: the validated request, and the
bodies of answers, stream chunks and errors.

Request fields that change the answer and that tinyvlm cannot honour (``n > 1``, tools, logprobs, JSON
response formats, frequency / presence penalties, logit biases) are refused with a 400 naming the field;
fields that do not change the answer (``user``, ``metadata``, ``store``, ...) are ignored, as OpenAI-compatible
servers do. Facts of the format: the `openai` package's ``types/chat`` models and ``_streaming.py``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tinyvlm.processing.processor import IMAGE_PLACEHOLDER

#: Error ``type`` per HTTP status. ``code`` is the status itself, as vLLM and llama.cpp's servers write it.
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server answers with an error body: HTTP ``status``, a message saying what to do, and the
    request field at fault (``param``, e.g. ``messages[0].content[1].image_url``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param)


def error_body(status: int, message: str, *, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}`` (the SDK unwraps ``error``)."""
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# ------------------------------------------------------------------------------------------------ request


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    #: ``data:image/...;base64,...`` or an ``http(s)://`` address.
    url: str
    #: OpenAI's resolution hint; tinyvlm always uses the encoder's own preprocessing.
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Model):
    #: ``developer`` is OpenAI's newer name for ``system``.
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: str | None = None

    @model_validator(mode="after")
    def _images_from_users(self) -> "ChatMessage":
        if self.role != "user" and isinstance(self.content, list):
            if any(isinstance(part, ImagePart) for part in self.content):
                raise ValueError(f"image_url parts go in user messages only, not in {self.role} messages")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    """``POST /v1/chat/completions``. Sampling defaults are tinyvlm's (greedy), not OpenAI's temperature 1."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # the older name of max_completion_tokens
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extensions, as tinyvlm's generate takes them
    repetition_penalty: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # refused unless left at the value that means "off"
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> "ChatRequest":
        refused = {
            "n": self.n not in (None, 1),
            "tools": bool(self.tools),
            "functions": bool(self.functions),
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "response_format": self.response_format is not None and self.response_format.get("type") != "text",
            "frequency_penalty": bool(self.frequency_penalty),
            "presence_penalty": bool(self.presence_penalty),
            "logit_bias": bool(self.logit_bias),
        }
        for field, is_set in refused.items():
            if is_set:
                raise _Unsupported(field)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        return self

    @property
    def answer_limit(self) -> int | None:
        """The most tokens the answer may have (None: as many as the context leaves)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class _Unsupported(ValueError):
    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is not supported by tinyvlm serve; leave it unset")
        self.field = field


def parse_request(body: Any) -> ChatRequest:
    """The request body (parsed JSON) -> a `ChatRequest`; any problem is a 400 `APIError` naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as error:
        raise validation_error(error) from None


def validation_error(error: ValidationError) -> APIError:
    """pydantic's problem as a 400: the field path in OpenAI's ``param`` style and pydantic's words. Of the
    problems of a ``str | list`` content, the one of the branch the input took is shown."""
    problems = error.errors()
    item = next((p for p in problems if "str" not in p["loc"][1:]), problems[0])
    cause = (item.get("ctx") or {}).get("error")
    if isinstance(cause, _Unsupported):
        return APIError(400, str(cause), param=cause.field)
    param = _param(item["loc"])
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "missing":
        message = "is required"
    elif item["type"] in ("string_type", "list_type") and _is_branch(item["loc"][-1]):  # neither branch fits
        message = "must be a string or a list of content parts"
    elif item["type"] in ("literal_error", "union_tag_invalid"):
        message = f"{message} (got {item.get('input')!r})"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("messages", 0, "content", "list[...]", 1, "image_url", "image_url", "url")`` ->
    ``messages[0].content[1].image_url.url``: pydantic's union branch names and the tag it inserts after a
    tagged union's index are left out."""
    path, tagged, skip_tag = "", False, False
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            skip_tag = tagged
        elif skip_tag:
            skip_tag = False
        elif _is_branch(part):
            tagged = "tagged-union" in part
        else:
            path += f".{part}" if path else part
    return path or None


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and (part == "str" or "[" in part)


# ------------------------------------------------------------------------------------- prompt conversion


def to_prompt(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages -> tinyvlm chat messages (each image part becomes an ``<image>`` placeholder at its
    place in the text) and the image URLs in prompt order, each with its ``param`` path."""
    prompt, urls = [], []
    for m, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            prompt.append({"role": role, "content": message.content})
            continue
        pieces = []
        for p, part in enumerate(message.content):
            if isinstance(part, TextPart):
                pieces.append(part.text)
            else:
                pieces.append(IMAGE_PLACEHOLDER)
                urls.append((part.image_url.url, f"messages[{m}].content[{p}].image_url.url"))
        prompt.append({"role": role, "content": "".join(pieces)})
    return prompt, urls


# ---------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def completion_body(
    id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``chat.completion`` object (one choice)."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    id: str,
    model: str,
    created: int,
    *,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: one choice with ``delta`` (and ``finish_reason`` on the last), or, given
    ``usage``, the final usage chunk with no choices. With ``include_usage`` every chunk carries a
    ``usage`` field (null until the last), as OpenAI sends them."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk
    chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def models_body(model: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model this server runs."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tinyvlm"}]}
