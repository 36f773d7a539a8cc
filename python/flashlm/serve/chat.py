"""Chat messages to prompt tokens through the model's own chat template (from its GGUF or HF files).

A model without a template cannot take chat requests: a 400 says so, rather than guessing a format the model
was never trained on.
"""

from flashlm.serve.protocol import APIError

ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(content, index: int) -> str:
    """A message's content: a string, or OpenAI's content parts of which only text ones are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content: only text parts are supported, got "
                                f"{str(part.get('type'))[:40]!r}", param=f"messages[{index}].content")
        texts.append(part["text"])
    return "".join(texts)


def render_messages(tokenizer, messages, add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` (ChatMessage models)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "messages: this model has no chat template; use /v1/completions with a prompt",
                       param="messages")
    plain = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {m.role[:40]!r}",
                           param=f"messages[{i}].role")
        entry = {"role": m.role, "content": _text(m.content, i)}
        if m.name is not None:
            entry["name"] = m.name
        plain.append(entry)
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's raise_exception, or a template that fails on these messages
        raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None


def chat_prompt_ids(tokenizer, messages, add_generation_prompt: bool = True) -> list:
    """The template writes the special tokens it wants (BOS included): encoded without adding them again, as
    LLM.chat does, and with special-token text parsed, as llama.cpp's server parses the rendered template
    (the template's own <|im_start|> must be that token; the same text inside a message is parsed too)."""
    text = render_messages(tokenizer, messages, add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False, parse_special=True))
