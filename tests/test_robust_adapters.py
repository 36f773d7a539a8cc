"""Adapter files from a hostile source: llama.cpp's GGUF LoRA adapters (flashlm.io.lora_adapter.load_lora) and
HF PEFT folders (flashlm.train.peft.load_peft, load_lora on a folder), each a valid adapter for the tiny llama of
tests/robust_models.py with one field changed. Each load runs in a forked child under a memory cap and a timeout
(tests/robust.py). A wrong shape, a rank that A and B do not share, a missing tensor, an adapter for another base,
a model file given as an adapter, an alpha that is missing, NaN or infinite, an unknown target or weights that are
not finite must raise an error naming the field or tensor, before the model is touched; a valid adapter loads
with one LoRA layer per adapted weight.
"""

import json
import math
import os
import struct

import numpy as np
import torch

import gguf_bytes as gb
import robust
import robust_models as rm
from robust import Case, value_case

R = 4  # the adapters' rank
KV = rm.KV_HEADS * rm.HEAD_DIM
# the adapted weights: llama.cpp's name -> (out, in)
GGUF_TARGETS = {"attn_q": (rm.D, rm.D), "attn_v": (KV, rm.D), "ffn_down": (rm.D, rm.FF)}


def warm():
    import flashlm.io.lora_adapter  # noqa: F401
    import flashlm.train.peft.peft_format  # noqa: F401
    import safetensors.torch  # noqa: F401


def model():
    from flashlm.models import ModelConfig, Transformer

    cfg = ModelConfig(arch="llama", vocab_size=rm.VOCAB, n_layer=rm.LAYERS, n_head=rm.HEADS, n_kv_head=rm.KV_HEADS,
                      d_model=rm.D, d_ff=rm.FF, seq_len=rm.CONTEXT)
    torch.manual_seed(0)
    return Transformer(cfg)


def write(data: bytes, name: str) -> str:
    path = os.path.join(robust.scratch(), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def edited(d: dict, changes) -> dict:
    """d with the keys of `changes` set to their values, or removed where the value is None."""
    d = dict(d)
    for key, value in (changes or {}).items():
        if value is None:
            d.pop(key)
        else:
            d[key] = value
    return d


def lora_layer_count(n):
    """A judge: the load returned a model with n LoRA layers."""
    def judge(outcome):
        from flashlm.models.lora import lora_layers

        if isinstance(outcome, BaseException):
            return f"raised {type(outcome).__name__} on a valid adapter: {robust.short(outcome)}"
        got = len(lora_layers(outcome))
        return None if got == n else f"loaded {got} LoRA layers, the adapter has {n}"
    return judge


# -- GGUF adapters ------------------------------------------------------------------------------------------------

def gguf_adapter_meta() -> dict:
    return {"general.architecture": (gb.STRING, "llama"), "general.type": (gb.STRING, "adapter"),
            "adapter.type": (gb.STRING, "lora"), "adapter.lora.alpha": (gb.FLOAT32, 8.0)}


def gguf_adapter_tensors() -> dict:
    """name -> (dims in GGUF order, ggml type, float32 values) of the valid adapter: A [R, in], B [out, R]."""
    rng = np.random.default_rng(3)
    tensors = {}
    for block in range(rm.LAYERS):
        for name, (rows, cols) in GGUF_TARGETS.items():
            stem = f"blk.{block}.{name}.weight"
            tensors[stem + ".lora_a"] = ((cols, R), gb.F32, rng.standard_normal((R, cols)).astype(np.float32))
            tensors[stem + ".lora_b"] = ((R, rows), gb.F32, rng.standard_normal((rows, R)).astype(np.float32))
    return tensors


def gguf_adapter(meta=None, drop=(), tensors=None) -> bytes:
    """The valid adapter's bytes with metadata replaced, added or removed (None), tensors dropped, replaced or
    added (name -> (dims, type, values))."""
    entries = edited(gguf_adapter_meta(), meta)
    layout = {k: v for k, v in gguf_adapter_tensors().items() if k not in drop}
    layout.update(tensors or {})
    infos, data = [], b""
    for name, (dims, ggml_type, values) in layout.items():
        data += bytes(gb.pad_to(len(data), 32) - len(data))
        infos.append(gb.tensor_info(name, dims, ggml_type, len(data)))
        data += values if isinstance(values, bytes) else np.ascontiguousarray(values).tobytes()
    return gb.gguf([gb.kv(k, t, v) for k, (t, v) in entries.items()], infos, data)


def load_gguf(data_fn):
    def call():
        from flashlm.io.lora_adapter import load_lora

        return load_lora(model(), write(data_fn(), "adapter.gguf"))
    return call


def f32(rows, cols, fill=0.5):
    return (cols, rows), gb.F32, np.full((rows, cols), fill, np.float32)


def gguf_cases():
    entry = "flashlm.io.lora_adapter.load_lora (GGUF)"
    a, b = "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"
    nan_a = gguf_adapter_tensors()[a]
    nan_a[2][1, 3] = math.nan
    cases = [
        value_case(entry, "a valid adapter", load_gguf(gguf_adapter), (), lora_layer_count(2 * len(GGUF_TARGETS))),
        Case(entry, "a model file, not an adapter", load_gguf(rm.gguf_model), ("general.type",)),
        Case(entry, "truncated in the tensor data", load_gguf(lambda: gguf_adapter()[:-100]), ("at byte", "lora")),
        Case(entry, "truncated in the header", load_gguf(lambda: gguf_adapter()[:40]), ("at byte", "lora")),
        Case(entry, "general.architecture qwen2 (an adapter for another base)",
             load_gguf(lambda: gguf_adapter({"general.architecture": (gb.STRING, "qwen2")})),
             ("general.architecture",)),
        Case(entry, "adapter.type prompt", load_gguf(lambda: gguf_adapter({"adapter.type": (gb.STRING, "prompt")})),
             ("adapter.type",)),
        Case(entry, "adapter.lora.alpha missing", load_gguf(lambda: gguf_adapter({"adapter.lora.alpha": None})),
             ("adapter.lora.alpha",)),
        Case(entry, "adapter.lora.alpha a string",
             load_gguf(lambda: gguf_adapter({"adapter.lora.alpha": (gb.STRING, "8")})), ("adapter.lora.alpha",)),
        Case(entry, "no tensors", load_gguf(lambda: gguf_adapter(drop=tuple(gguf_adapter_tensors()))), ("lora_a",)),
        Case(entry, "lora_b missing", load_gguf(lambda: gguf_adapter(drop=(b,))), ("blk.0.attn_q",)),
        Case(entry, "lora_a missing", load_gguf(lambda: gguf_adapter(drop=(a,))), ("blk.0.attn_q",)),
        Case(entry, "A and B of other ranks (A 4, B 3)", load_gguf(lambda: gguf_adapter(tensors={b: f32(rm.D, 3)})),
             (b,)),
        Case(entry, "A's width is another model's (64 columns)",
             load_gguf(lambda: gguf_adapter(tensors={a: f32(R, 64)})), (a,)),
        Case(entry, "B's rows are another model's (64)", load_gguf(lambda: gguf_adapter(tensors={b: f32(64, R)})),
             (b,)),
        Case(entry, "A 1-D", load_gguf(lambda: gguf_adapter(tensors={a: ((rm.D,), gb.F32, np.ones(rm.D, np.float32))})),
             (a,)),
        Case(entry, "A of rank 0 and B of rank 0", load_gguf(lambda: gguf_adapter(tensors={
            a: ((rm.D, 0), gb.F32, b""), b: ((0, rm.D), gb.F32, b"")})), (a, b, "at byte")),
        Case(entry, "a block the model lacks (blk.7)",
             load_gguf(lambda: gguf_adapter(tensors={"blk.7.attn_q.weight.lora_a": f32(R, rm.D),
                                                     "blk.7.attn_q.weight.lora_b": f32(rm.D, R)})),
             ("blk.7.attn_q.weight.lora_a", "blk.7.attn_q.weight.lora_b")),
        Case(entry, "an unknown target (blk.0.attn_qkv)",
             load_gguf(lambda: gguf_adapter(tensors={"blk.0.attn_qkv.weight.lora_a": f32(R, rm.D),
                                                     "blk.0.attn_qkv.weight.lora_b": f32(3 * rm.D, R)})),
             ("blk.0.attn_qkv.weight.lora_a", "blk.0.attn_qkv.weight.lora_b")),
        Case(entry, "a tensor that is not lora_a/lora_b", load_gguf(lambda: gguf_adapter(tensors={
            "token_embd.weight": f32(rm.VOCAB, rm.D)})), ("token_embd.weight",)),
        Case(entry, "a NaN in A", load_gguf(lambda: gguf_adapter(tensors={a: nan_a})), (a,)),
        Case(entry, "an inf in B", load_gguf(lambda: gguf_adapter(tensors={b: f32(rm.D, R, math.inf)})), (b,)),
        Case(entry, "A stored as I32", load_gguf(lambda: gguf_adapter(tensors={
            a: ((rm.D, R), gb.I32, np.ones((R, rm.D), np.int32))})), (a,)),
        Case(entry, "A claims 2**40 rows", load_gguf(lambda: gguf_adapter(tensors={
            a: ((rm.D, 1 << 40), gb.F32, np.ones((R, rm.D), np.float32))})), (a, "at byte")),
    ]
    for alpha in (math.nan, math.inf, -1.0):
        cases.append(Case(entry, f"adapter.lora.alpha {alpha}", load_gguf(
            lambda alpha=alpha: gguf_adapter({"adapter.lora.alpha": (gb.FLOAT32, alpha)})), ("adapter.lora.alpha",)))
    return cases


# -- PEFT folders -------------------------------------------------------------------------------------------------

PEFT_TARGETS = ("q_proj", "v_proj", "down_proj")
PEFT_SHAPES = {"self_attn.q_proj": (rm.D, rm.D), "self_attn.v_proj": (KV, rm.D), "mlp.down_proj": (rm.D, rm.FF)}


def peft_config() -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 8, "lora_dropout": 0.0,
            "target_modules": list(PEFT_TARGETS), "use_rslora": False, "bias": "none", "use_dora": False,
            "base_model_name_or_path": None}


def peft_tensors() -> dict:
    g = torch.Generator().manual_seed(4)
    out = {}
    for block in range(rm.LAYERS):
        for module, (rows, cols) in PEFT_SHAPES.items():
            stem = f"base_model.model.model.layers.{block}.{module}"
            out[stem + ".lora_A.weight"] = torch.randn(R, cols, generator=g)
            out[stem + ".lora_B.weight"] = torch.randn(rows, R, generator=g)
    return out


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def peft_dir(config=None, drop=(), tensors=None, config_text=None, weights_bytes=None) -> str:
    """The valid folder with config keys replaced (None: removed), tensors dropped or replaced, or either file's
    raw contents given."""
    from safetensors.torch import save_file

    path = robust.scratch()
    cfg = edited(peft_config(), config)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write(config_text if config_text is not None else json.dumps(cfg))
    weights = os.path.join(path, "adapter_model.safetensors")
    if weights_bytes is not None:
        with open(weights, "wb") as f:
            f.write(weights_bytes)
    else:
        state = {k: v for k, v in peft_tensors().items() if k not in drop}
        state.update(tensors or {})
        save_file(state, weights)
    return path


def on_model(module: str, function: str):
    """A loader: folder_fn -> the call `module.function(model(), folder_fn())`, run in the child."""
    def loader(folder_fn):
        def call():
            import importlib

            return getattr(importlib.import_module(module), function)(model(), folder_fn())
        return call
    return loader


load_peft = on_model("flashlm.train.peft.peft_format", "load_peft")
load_folder = on_model("flashlm.io.lora_adapter", "load_lora")
runtime_table = on_model("flashlm.io.lora_adapter", "load_adapter")


def safetensors_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def peft_cases():
    cases = []
    nan_b = peft_tensors()[B0].clone()
    nan_b[1, 2] = math.nan
    for entry, loader in (("flashlm.train.peft.load_peft", load_peft), ("flashlm.io.lora_adapter.load_lora (PEFT)",
                                                                         load_folder)):
        cases += [
            value_case(entry, "a valid folder", loader(peft_dir), (), lora_layer_count(2 * len(PEFT_TARGETS))),
            Case(entry, "adapter_config.json a JSON list", loader(lambda: peft_dir(config_text="[1, 2]")),
                 ("adapter_config.json",)),
            Case(entry, "adapter_config.json not JSON", loader(lambda: peft_dir(config_text="{r: 4")),
                 ("adapter_config.json",)),
            Case(entry, "peft_type missing", loader(lambda: peft_dir({"peft_type": None})), ("peft_type",)),
            Case(entry, "peft_type IA3", loader(lambda: peft_dir({"peft_type": "IA3"})), ("peft_type",)),
            Case(entry, "r 8, the tensors' rank 4", loader(lambda: peft_dir({"r": 8})), (A0,)),
            Case(entry, "r 0", loader(lambda: peft_dir({"r": 0})), ("r",)),
            Case(entry, "r a string", loader(lambda: peft_dir({"r": "4"})), ("r",)),
            Case(entry, "r true", loader(lambda: peft_dir({"r": True})), ("r",)),
            Case(entry, "r 2**40", loader(lambda: peft_dir({"r": 1 << 40})), (A0, "r")),
            Case(entry, "lora_alpha NaN", loader(lambda: peft_dir(config_text=json.dumps(
                {**peft_config(), "lora_alpha": math.nan}))), ("alpha", "lora_alpha")),
            Case(entry, "lora_alpha Infinity", loader(lambda: peft_dir(config_text=json.dumps(
                {**peft_config(), "lora_alpha": math.inf}))), ("alpha", "lora_alpha")),
            Case(entry, "lora_alpha 0", loader(lambda: peft_dir({"lora_alpha": 0})), ("alpha", "lora_alpha")),
            Case(entry, "lora_dropout 1.5", loader(lambda: peft_dir({"lora_dropout": 1.5})),
                 ("dropout", "lora_dropout")),
            Case(entry, "use_rslora a string", loader(lambda: peft_dir({"use_rslora": "yes"})), ("use_rslora",)),
            Case(entry, "use_dora true", loader(lambda: peft_dir({"use_dora": True})), ("use_dora",)),
            Case(entry, "target_modules an unknown name", loader(lambda: peft_dir({"target_modules": ["qq_proj"]})),
                 ("targets", "target_modules")),
            Case(entry, "target_modules 'all-linear'", loader(lambda: peft_dir({"target_modules": "all-linear"})),
                 ("target_modules",)),
            Case(entry, "target_modules missing", loader(lambda: peft_dir({"target_modules": None})),
                 ("target_modules",)),
            Case(entry, "a tensor missing", loader(lambda: peft_dir(drop=(B0,))), (B0,)),
            Case(entry, "a tensor of a layer the model lacks", loader(lambda: peft_dir(tensors={
                A0.replace("layers.0", "layers.9"): torch.zeros(R, rm.D)})), (A0.replace("layers.0", "layers.9"),)),
            Case(entry, "A and B of other ranks (B 5)", loader(lambda: peft_dir(tensors={B0: torch.zeros(rm.D, 5)})),
                 (B0,)),
            Case(entry, "an adapter for a wider base (A 4 x 64)", loader(lambda: peft_dir(tensors={
                A0: torch.zeros(R, 64)})), (A0,)),
            Case(entry, "A int64", loader(lambda: peft_dir(tensors={A0: torch.ones(R, rm.D, dtype=torch.int64)})),
                 (A0,)),
            Case(entry, "a NaN in B", loader(lambda: peft_dir(tensors={B0: nan_b})), (B0,)),
            Case(entry, "adapter_model.safetensors missing", loader(lambda: os.remove(os.path.join(
                d := peft_dir(), "adapter_model.safetensors")) or d), ("adapter_model.safetensors",)),
            Case(entry, "adapter_model.safetensors garbage", loader(lambda: peft_dir(weights_bytes=b"\xff" * 64)),
                 ("adapter_model.safetensors",)),
            Case(entry, "adapter_model.safetensors whose header claims 2**62 bytes",
                 loader(lambda: peft_dir(weights_bytes=struct.pack("<Q", 1 << 62) + b"{}")),
                 ("adapter_model.safetensors",)),
            Case(entry, "a tensor whose offsets run past the file", loader(lambda: peft_dir(
                weights_bytes=safetensors_header({A0: {"dtype": "F32", "shape": [R, rm.D],
                                                       "data_offsets": [0, 1 << 40]}}))),
                 ("adapter_model.safetensors",)),
        ]
    return cases


# -- prompt and prefix tuning folders ------------------------------------------------------------------------------

P = 3  # virtual tokens
PREFIX_WIDTH = rm.LAYERS * 2 * KV  # every layer's key and value per virtual token


def prompt_dir(kind="PROMPT_TUNING", config=None, table=None) -> str:
    """A valid prompt- (or prefix-) tuning folder as PEFT writes it, config keys replaced (None: removed) or the
    table given."""
    from safetensors.torch import save_file

    prompt = kind == "PROMPT_TUNING"
    cfg = {"peft_type": kind, "task_type": "CAUSAL_LM", "num_virtual_tokens": P, "num_transformer_submodules": 1,
           "num_layers": rm.LAYERS, "token_dim": rm.D if prompt else KV,
           "num_attention_heads": rm.HEADS if prompt else rm.KV_HEADS}
    cfg = edited(cfg, config)
    path = robust.scratch()
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write(json.dumps(cfg))
    if table is None:
        table = torch.randn(cfg["num_virtual_tokens"] if isinstance(cfg.get("num_virtual_tokens"), int) else P,
                            rm.D if prompt else PREFIX_WIDTH, generator=torch.Generator().manual_seed(6))
    save_file({"prompt_embeddings": table}, os.path.join(path, "adapter_model.safetensors"))
    return path


def virtual_tokens(n):
    def judge(outcome):
        if isinstance(outcome, BaseException):
            return f"raised {type(outcome).__name__} on a valid adapter: {robust.short(outcome)}"
        rows = outcome[1].shape[0] if isinstance(outcome, tuple) else outcome.num_virtual_tokens
        return None if rows == n else f"{rows} virtual tokens, the adapter has {n}"
    return judge


def prompt_cases():
    cases = []
    nan_table = torch.zeros(P, rm.D)
    nan_table[0, 0] = math.nan
    for entry, loader in (("flashlm.train.peft.load_peft (prompt tuning)", load_peft),
                          ("flashlm.io.lora_adapter.load_adapter (prompt tuning)", runtime_table)):
        cases += [
            value_case(entry, "a valid prompt-tuning folder", loader(prompt_dir), (), virtual_tokens(P)),
            value_case(entry, "a valid prefix-tuning folder", loader(lambda: prompt_dir("PREFIX_TUNING")), (),
                       virtual_tokens(P)),
            Case(entry, "num_virtual_tokens 0", loader(lambda: prompt_dir(config={"num_virtual_tokens": 0})),
                 ("num_virtual_tokens",)),
            Case(entry, "num_virtual_tokens a string", loader(lambda: prompt_dir(config={"num_virtual_tokens": "3"})),
                 ("num_virtual_tokens",)),
            Case(entry, "num_virtual_tokens 2**40 (the table 3 rows)", loader(lambda: prompt_dir(
                config={"num_virtual_tokens": 1 << 40}, table=torch.zeros(P, rm.D))),
                 ("num_virtual_tokens", "prompt_embeddings")),
            Case(entry, "num_virtual_tokens the whole context", loader(lambda: prompt_dir(
                config={"num_virtual_tokens": rm.CONTEXT})), ("num_virtual_tokens",)),
            Case(entry, "token_dim of another model", loader(lambda: prompt_dir(config={"token_dim": 64})),
                 ("token_dim", "prompt_embeddings")),
            Case(entry, "num_layers of another model", loader(lambda: prompt_dir(config={"num_layers": 5})),
                 ("num_layers",)),
            Case(entry, "prefix tuning, num_attention_heads of another layout (4 K/V heads of 4)", loader(
                lambda: prompt_dir("PREFIX_TUNING", config={"num_attention_heads": 4})), ("num_attention_heads",)),
            Case(entry, "prefix_projection true", loader(lambda: prompt_dir(config={"prefix_projection": True})),
                 ("prefix_projection",)),
            Case(entry, "num_transformer_submodules 2", loader(lambda: prompt_dir(
                config={"num_transformer_submodules": 2})), ("num_transformer_submodules",)),
            Case(entry, "a table of another width", loader(lambda: prompt_dir(table=torch.zeros(P, 64))),
                 ("prompt_embeddings",)),
            Case(entry, "a NaN in the table", loader(lambda: prompt_dir(table=nan_table)), ("prompt_embeddings",)),
            Case(entry, "an int64 table", loader(lambda: prompt_dir(table=torch.zeros(P, rm.D, dtype=torch.int64))),
                 ("prompt_embeddings",)),
        ]
    return cases


CASES = gguf_cases() + peft_cases() + prompt_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
