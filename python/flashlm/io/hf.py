"""load_hf: an HF transformers model directory (config.json, *.safetensors, tokenizer files) as a flashlm
Transformer in eval mode.

    loaded = load_hf("TinyLlama-1.1B/", dtype=torch.bfloat16, quantize="int8", max_model_len=4096)
    logits, _ = loaded.model(torch.tensor([loaded.tokenizer.encode("Hello")]))

The tokenizer is tokenizer.json (the `tokenizers` library); its chat template and special tokens come from
tokenizer_config.json (or chat_template.jinja, where newer transformers writes the template), and the ids that
end generation from generation_config.json when it is there, else config.json.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from flashlm.io.hf_config import model_config_from_hf, read_json
from flashlm.io.hf_weights import read_hf_state_dict
from flashlm.io.loaded import LoadedModel, empty_model, finish, quantize_block_linears
from flashlm.io.tokenizer import Tokenizer, check_fits_model

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ids(value, where: str) -> list[int]:
    """An id or a list of ids (as HF configs write eos_token_id) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: token ids must be non-negative integers, got {value!r}")
    return list(values)


def _token_content(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: str, tok_cfg: dict) -> Optional[str]:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_hf_tokenizer(path: str, config: dict, vocab_size: int) -> Optional[Tokenizer]:
    """The directory's tokenizer, or None when it has no tokenizer.json; ValueError when it has more tokens than
    the model's vocab_size (its embedding's rows)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        backend = HFTokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{file}: cannot load ({e})") from e
    check_fits_model(backend, vocab_size, file)
    tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
    gen_cfg = read_json(os.path.join(path, "generation_config.json")) or {}
    bos_token, eos_token = _token_content(tok_cfg.get("bos_token")), _token_content(tok_cfg.get("eos_token"))

    if "eos_token_id" in gen_cfg:
        eos_ids = _ids(gen_cfg["eos_token_id"], "generation_config.json: eos_token_id")
    else:
        eos_ids = _ids(config.get("eos_token_id"), "config.json: eos_token_id")
    if not eos_ids and eos_token is not None and backend.token_to_id(eos_token) is not None:
        eos_ids = [backend.token_to_id(eos_token)]
    bos = gen_cfg.get("bos_token_id", config.get("bos_token_id"))
    if bos is None and bos_token is not None:
        bos = backend.token_to_id(bos_token)
    bos_ids = _ids(bos, "bos_token_id")
    return Tokenizer(backend, eos_token_ids=eos_ids, bos_token_id=bos_ids[0] if bos_ids else None,
                     chat_template=_chat_template(path, tok_cfg), bos_token=bos_token, eos_token=eos_token)


def load_hf(path, dtype: torch.dtype = torch.float32, quantize: Optional[str] = None,
            max_model_len: Optional[int] = None, attn_impl: str = "flashlm") -> LoadedModel:
    """Loads an HF model directory (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel).

    dtype: the parameters' dtype (float32, bfloat16 or float16); quantize: None, "int8" (Int8Linear) or "int4"
    (Int4Linear) for the blocks' linear layers; max_model_len: caps the context (seq_len)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {_DTYPES}, got {dtype}")
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"quantize: must be None, 'int8' or 'int4', got {quantize!r}")
    hf_cfg = read_json(os.path.join(path, "config.json"), required=True)
    cfg = model_config_from_hf(hf_cfg, max_model_len)
    tokenizer = load_hf_tokenizer(path, hf_cfg, cfg.vocab_size)  # before the weights: it is cheap to refuse
    # quantize from float32 weights, then cast what stays float
    state = read_hf_state_dict(path, cfg, torch.float32 if quantize else dtype)
    model = empty_model(cfg, attn_impl)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if quantize:
        quantize_block_linears(model, quantize)
        for p in model.parameters():  # what stays float (embeddings, norms, lm head); the quantized buffers
            p.data = p.data.to(dtype)   # keep their own dtypes (float32 scales)
    finish(model)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer,
                       eos_token_ids=list(tokenizer.eos_token_ids) if tokenizer else
                       _ids(hf_cfg.get("eos_token_id"), "config.json: eos_token_id"),
                       bos_token_id=tokenizer.bos_token_id if tokenizer else None,
                       chat_template=tokenizer.chat_template if tokenizer else None, source=f"hf:{path}")
