"""POST /v1/completions and POST /v1/chat/completions: a request becomes engine requests (one per prompt, each
with n samples), whose outputs become one JSON response or a stream of server-sent events ending in
`data: [DONE]`."""

import json

from starlette.responses import JSONResponse, StreamingResponse

from flashlm.serve.chat import chat_prompt_ids
from flashlm.serve.engine_loop import EngineError
from flashlm.serve.group import RequestGroup
from flashlm.serve.params import CHAT_NAMES, COMPLETION_NAMES, chat_params, completion_params
from flashlm.serve.protocol import APIError, bad_request_from
from flashlm.serve.responses import (TextCursor, chat_logprobs, completion_logprobs, envelope, new_id, now,
                                     token_namer, usage)

# Choices one HTTP request may ask for (prompts x n): each is a sequence in the engine.
MAX_CHOICES = 1024


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _prompt_ids(server, prompt, n: int) -> list:
    """The prompts of a completion request as token-id lists: text, token ids, or a list of either. Their count
    is checked before any is tokenized."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: is empty", param="prompt")
    _check_choices(len(prompt), n)
    return [server.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _check_room(server, ids: list, max_tokens) -> None:
    """OpenAI refuses a request whose prompt and max_tokens together exceed the context. A prompt that leaves no
    room at all is the engine's to report (add_request names the prompt)."""
    limit = server.llm.max_model_len
    if max_tokens is not None and len(ids) < limit and len(ids) + max_tokens > limit:
        raise APIError(400, f"max_tokens: the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed this "
                            f"model's context of {limit} tokens", param="max_tokens")


def _check_choices(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise APIError(400, f"n: {num_prompts} prompts x n {n} exceed {MAX_CHOICES} choices per request",
                       param="n")


async def _submit(server, request, prompts: list, params, rename: dict) -> RequestGroup:
    _check_choices(len(prompts), params.n)
    for ids in prompts:
        _check_room(server, ids, params.max_tokens)
    group = RequestGroup(server.engine, request)
    for ids in prompts:
        try:
            await group.add(ids, params)
        except (ValueError, TypeError) as e:
            raise bad_request_from(e, rename) from None
    return group


async def _respond(group: RequestGroup, writer, stream: bool):
    """The stream of events, or the whole response once every prompt's requests have finished (a client that
    left first gets nothing: 499, nginx's code for it, lands in no one's hands)."""
    if stream:
        return StreamingResponse(writer.stream(group), media_type="text/event-stream")
    finals = [None] * len(group.request_ids)
    try:
        async for i, out in group.outputs():
            finals[i] = out
    except EngineError as e:
        raise APIError(500, str(e), type="server_error") from None
    if group.client_gone:
        return JSONResponse({}, status_code=499)
    return writer.response(finals)


class _Delta:
    """What a stream sends next for one sample: its new text and tokens, and whether it is its first piece."""
    __slots__ = ("prompt", "out", "sample", "text", "tokens", "first")

    def __init__(self, prompt, out, sample, text, tokens, first):
        self.prompt, self.out, self.sample, self.text, self.tokens, self.first = \
            prompt, out, sample, text, tokens, first


async def _deltas(group: RequestGroup, num_prompts: int, params, last: list):
    """The _Delta of each sample that has something new (text, tokens or its finish), as outputs arrive;
    `last` keeps each prompt's latest output (for the usage)."""
    cursors = [[TextCursor(params.stop) for _ in range(params.n)] for _ in range(num_prompts)]
    done = [[False] * params.n for _ in range(num_prompts)]
    async for i, out in group.outputs():
        last[i] = out
        for c in out.outputs:
            if done[i][c.index]:
                continue
            cur, finished = cursors[i][c.index], c.finish_reason is not None
            first = cur.tokens_sent == 0 and cur.text_sent == 0
            text = cur.next_text(c.text, finished)
            tokens = cur.next_tokens(len(c.token_ids))
            if text or len(tokens) or finished:
                done[i][c.index] = finished
                yield _Delta(i, out, c, text, tokens, first)


def _error_event(e: EngineError) -> str:
    return sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})


class _Completion:
    """One /v1/completions request: its prompts' engine requests and how their outputs are written."""

    def __init__(self, server, body, params, prompts):
        self.server, self.body, self.params, self.prompts = server, body, params, prompts
        self.tok = server.tokenizer
        self.name = token_namer(self.tok, body.return_tokens_as_token_ids)
        self.id, self.created = new_id("cmpl"), now()

    def _echo_text(self, i: int) -> str:
        p = self.body.prompt
        texts = [p] if isinstance(p, str) else p if p and isinstance(p[0], str) else None
        return texts[i] if texts is not None else self.tok.decode(self.prompts[i])

    def _logprobs(self, out, c, tokens: range, with_prompt: bool, offset: int):
        if getattr(self.params, "logprobs", None) is None:
            return None
        entries = []
        if with_prompt:
            entries += list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)))
        entries += [(c.token_ids[j], c.logprobs[j]) for j in tokens]
        return completion_logprobs(self.name, entries, offset)

    def _choice(self, i, c, text, logprobs, finish, tokens: range, first: bool) -> dict:
        choice = {"index": i * self.params.n + c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if self.body.return_token_ids:
            choice["token_ids"] = [c.token_ids[j] for j in tokens]
            if first:
                choice["prompt_token_ids"] = list(self.prompts[i])
        return choice

    def response(self, finals) -> dict:
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            echo = self._echo_text(i) if self.body.echo else ""
            for c in out.outputs:
                tokens = range(len(c.token_ids))
                lp = self._logprobs(out, c, tokens, self.body.echo, 0)
                choices.append(self._choice(i, c, echo + c.text, lp, c.finish_reason, tokens, True))
                completion_tokens += len(c.token_ids)
        return envelope(self.id, "text_completion", self.server.model_name, self.created, choices,
                        usage(sum(len(p) for p in self.prompts), completion_tokens))

    async def stream(self, group):
        last = [None] * len(self.prompts)
        try:
            async for d in _deltas(group, len(self.prompts), self.params, last):
                echo = d.first and self.body.echo
                text = (self._echo_text(d.prompt) if echo else "") + d.text
                logprobs = self._logprobs(d.out, d.sample, d.tokens, echo, 0)
                choice = self._choice(d.prompt, d.sample, text, logprobs, d.sample.finish_reason, d.tokens, d.first)
                yield sse(envelope(self.id, "text_completion", self.server.model_name, self.created, [choice]))
        except EngineError as e:
            yield _error_event(e)
        if group.client_gone:
            return
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            completion_tokens = sum(len(c.token_ids) for out in last if out for c in out.outputs)
            yield sse(envelope(self.id, "text_completion", self.server.model_name, self.created, [],
                               usage(sum(len(p) for p in self.prompts), completion_tokens)))
        yield SSE_DONE


async def create_completion(server, body, request):
    server.check_model(body.model)
    params = completion_params(body)
    prompts = _prompt_ids(server, body.prompt, params.n)
    group = await _submit(server, request, prompts, params, COMPLETION_NAMES)
    return await _respond(group, _Completion(server, body, params, prompts), body.stream)


class _Chat:
    def __init__(self, server, body, params, prompt):
        self.server, self.body, self.params, self.prompt = server, body, params, prompt
        self.tok = server.tokenizer
        self.name = token_namer(self.tok, body.return_tokens_as_token_ids)
        self.id, self.created = new_id("chatcmpl"), now()

    def _logprobs(self, c, tokens: range):
        if not self.body.logprobs:
            return None
        return chat_logprobs(self.name, [(c.token_ids[j], c.logprobs[j]) for j in tokens], self.body.top_logprobs or 0)

    def response(self, finals) -> dict:
        out = finals[0]
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c, range(len(c.token_ids))), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        return envelope(self.id, "chat.completion", self.server.model_name, self.created, choices,
                        usage(len(self.prompt), sum(len(c.token_ids) for c in out.outputs)))

    def _chunk(self, choices) -> str:
        return sse(envelope(self.id, "chat.completion.chunk", self.server.model_name, self.created, choices))

    async def stream(self, group):
        n = self.params.n
        yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for i in range(n)])
        last = [None]
        try:
            async for d in _deltas(group, 1, self.params, last):
                c = d.sample
                yield self._chunk([{"index": c.index, "delta": {"content": d.text} if d.text else {},
                                    "logprobs": self._logprobs(c, d.tokens), "finish_reason": c.finish_reason}])
        except EngineError as e:
            yield _error_event(e)
        if group.client_gone:
            return
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            completion_tokens = sum(len(c.token_ids) for c in last[0].outputs) if last[0] else 0
            yield sse(envelope(self.id, "chat.completion.chunk", self.server.model_name, self.created, [],
                               usage(len(self.prompt), completion_tokens)))
        yield SSE_DONE


async def create_chat_completion(server, body, request):
    server.check_model(body.model)
    params = chat_params(body)
    prompt = chat_prompt_ids(server.tokenizer, body.messages, body.add_generation_prompt)
    group = await _submit(server, request, [prompt], params, CHAT_NAMES)
    return await _respond(group, _Chat(server, body, params, prompt), body.stream)
