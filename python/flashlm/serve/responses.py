"""Engine outputs in OpenAI's response shapes: choices, usage, logprobs, and the text a stream sends next."""

import math
import time
import uuid

# JSON has no -inf: a token the sampler could never pick reports this instead (vLLM's choice too).
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(id: str, object: str, model: str, created: int, choices: list, usage=None) -> dict:
    body = {"id": id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


class TextCursor:
    """What of a sample's text a stream has sent. While the sample runs, text that may still change is held
    back: a trailing replacement character (a UTF-8 sequence split across tokens) and the last
    len(longest stop string) - 1 characters (they may begin a stop string, which is cut from the output)."""

    def __init__(self, stop):
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text_sent = 0
        self.tokens_sent = 0

    def next_text(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            end -= self.holdback
            while end > self.text_sent and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.text_sent:
            return ""
        piece = text[self.text_sent:end]
        self.text_sent = end
        return piece

    def next_tokens(self, num_tokens: int) -> range:
        new = range(self.tokens_sent, num_tokens)
        self.tokens_sent = num_tokens
        return new


def token_namer(tokenizer, as_ids: bool):
    """How logprobs name a token: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids, for clients
    that need every token told apart: two tokens can decode to the same text)."""
    if as_ids:
        return lambda token_id, logprob: f"token_id:{token_id}"

    def name(token_id, logprob):
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if decoded is not None else tokenizer.decode([token_id])
    return name


def completion_logprobs(name, entries: list, offset: int = 0) -> dict:
    """OpenAI's legacy logprobs object for (token_id, {id: Logprob} or None) pairs: tokens, token_logprobs,
    top_logprobs (the sampled token and the top N, keyed by name(id, logprob)) and text_offset (from
    `offset`)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, top in entries:
        chosen = top.get(token_id) if top else None
        text = name(token_id, chosen)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if top is None:  # the prompt's first token: nothing comes before it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_finite(chosen.logprob) if chosen is not None else None)
        ranked = sorted(top.items(), key=lambda kv: kv[1].rank)
        out["top_logprobs"].append({name(i, lp): _finite(lp.logprob) for i, lp in ranked})
    return out


def _chat_entry(name, token_id, lp) -> dict:
    text = name(token_id, lp)
    return {"token": text, "logprob": _finite(lp.logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(name, entries: list, top_n: int) -> dict:
    """Chat's logprobs object: per token, its logprob and the top_n most likely tokens."""
    content = []
    for token_id, top in entries:
        entry = _chat_entry(name, token_id, top[token_id])
        ranked = sorted(top.items(), key=lambda kv: kv[1].rank)
        entry["top_logprobs"] = [_chat_entry(name, i, lp) for i, lp in ranked if lp.rank <= top_n][:top_n]
        content.append(entry)
    return {"content": content, "refusal": None}
