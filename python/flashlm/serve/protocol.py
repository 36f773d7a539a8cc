"""The OpenAI API's request bodies as pydantic models, field for field (with vLLM's extra sampling fields), and
the error object every failure is answered with.

Unknown fields are ignored, as OpenAI and vLLM ignore them; a known field of the wrong type or out of its range
is a 400 naming the field. The ranges themselves are SamplingParams' checks (one place), reached when the
request is translated (flashlm.serve.params).
"""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields completions and chat completions share."""
    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None  # None: 1.0, OpenAI's default
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    min_tokens: int = 0  # accepted for clients that send it; only 0 is supported (see params.py)
    return_token_ids: bool = False  # vLLM's: each choice also carries its token ids (and its prompt's)
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>", not by text


class CompletionRequest(_Sampling):
    # text, token ids, or a list of either
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None  # {"name": ..., "schema": {...}, "strict": ...}


class ChatMessage(_Body):
    role: str
    # text, or OpenAI's content parts [{"type": "text", "text": ...}, ...]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request_from(e: Exception, rename: Optional[dict] = None) -> APIError:
    """A 400 from a ValueError/TypeError of flashlm's checks, whose messages start with the argument's name
    ("temperature: must be >= 0, got -1"): that name, renamed to the API's where they differ, is the param."""
    text = str(e)
    name, sep, _ = text.partition(":")
    param = name.strip() if sep and name.strip().isidentifier() else None
    if param is not None and rename:
        param = rename.get(param, param)
    return APIError(400, text, param=param)
