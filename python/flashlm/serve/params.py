"""From an API request to the engine's SamplingParams: OpenAI's names and defaults in, SamplingParams out, its
own checks (ranges, types) reported as 400s that name the field."""

from typing import Optional

from flashlm.runtime.sampling_params import SamplingParams
from flashlm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request_from

# OpenAI's limit on top_logprobs / logprobs alternatives.
MAX_LOGPROBS = 20
# SamplingParams' field -> the API field a client set, where they differ.
CHAT_NAMES = {"logprobs": "top_logprobs", "structured_outputs": "response_format"}
COMPLETION_NAMES = {"prompt_logprobs": "logprobs"}


def _check_logprobs(value: Optional[int], name: str) -> None:
    if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS):
        raise APIError(400, f"{name}: must be in [0, {MAX_LOGPROBS}], got {value}", param=name)


def _common(req) -> dict:
    if req.min_tokens:
        raise APIError(400, "min_tokens: not supported (use ignore_eos for fixed-length outputs)", param="min_tokens")
    kw = dict(n=req.n, stop=req.stop, seed=req.seed, ignore_eos=req.ignore_eos)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "stop_token_ids"):
        value = getattr(req, name)
        if value is not None:  # None: the engine's default, which is OpenAI's
            kw[name] = value
    return kw


def _make(kw: dict, rename: dict) -> SamplingParams:
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise bad_request_from(e, rename) from None


def completion_params(req: CompletionRequest) -> SamplingParams:
    """echo with logprobs asks for the prompt's logprobs too (computed in the prefill)."""
    if req.suffix:
        raise APIError(400, "suffix: not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
    _check_logprobs(req.logprobs, "logprobs")
    kw = _common(req)
    kw["max_tokens"] = req.max_tokens
    if req.logprobs is not None:
        kw["logprobs"] = req.logprobs
        if req.echo:
            kw["prompt_logprobs"] = req.logprobs
    return _make(kw, COMPLETION_NAMES)


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    _check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    kw = _common(req)
    kw["max_tokens"] = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.logprobs:
        kw["logprobs"] = req.top_logprobs or 0
    structured = _structured(req.response_format)
    if structured is not None:
        kw["structured_outputs"] = structured
    return _make(kw, CHAT_NAMES)


def _structured(fmt):
    """response_format -> the engine's StructuredOutputsParams (None for plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    schema = (fmt.json_schema or {}).get("schema")
    if fmt.type == "json_schema" and not isinstance(schema, (dict, str)):
        raise APIError(400, "response_format: json_schema needs a 'schema' (a JSON schema object)",
                       param="response_format")
    from flashlm.runtime.structured import StructuredOutputsParams

    try:
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=schema)
    except (ValueError, TypeError) as e:
        raise bad_request_from(e, CHAT_NAMES) from None
