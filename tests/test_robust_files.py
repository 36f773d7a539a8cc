"""Files from a hostile source: GGUF files (flashlm.gguf.GGUFFile and flashlm.io.load_model), HF model
directories and flashlm training checkpoints, each a valid tiny model (tests/robust_models.py) with one
field changed. Each load runs in a forked child under a memory cap and a timeout (tests/robust.py): a count,
size or id from a file must be checked before it is trusted (never a hang, a huge allocation or a crash) and
the error must name the field (a metadata key, a tensor, a config key) or, for the GGUF format itself, the
byte offset. tests/test_gguf_malformed.py holds the byte-level GGUF parser cases; here the fields the
loaders read come on top.
"""

import argparse
import json
import math
import os
import random

import numpy as np
import torch

import gguf_bytes as gb
import robust
import robust_models as rm
from robust import Case, value_case

def warm():
    """Imports and the valid models' state, once in the server."""
    import flashlm.io.checkpoint_model  # noqa: F401
    import flashlm.io.gguf_model  # noqa: F401
    import flashlm.io.gguf_vocab  # noqa: F401
    import flashlm.io.hf  # noqa: F401
    import flashlm.runtime.engine  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401

    rm.bpe_tokenizer_json()
    rm.checkpoint_state()


def write(data: bytes, name="model.gguf") -> str:
    path = os.path.join(robust.scratch(), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def loads_model(n_layer, vocab):
    """A judge: the load returned a model of n_layer blocks and vocab rows (or raised as any case may)."""
    def judge(outcome):
        if isinstance(outcome, BaseException):
            return f"raised {type(outcome).__name__} on a valid file: {robust.short(outcome)}"
        cfg = outcome.config
        if (cfg.n_layer, cfg.vocab_size) != (n_layer, vocab):
            return f"loaded n_layer {cfg.n_layer}, vocab {cfg.vocab_size}; the file has {n_layer}, {vocab}"
        return None
    return judge


def load(path_fn, **kwargs):
    def call():
        from flashlm.io import load_model

        return load_model(path_fn(), **kwargs)
    return call


# -- GGUF: the reader and load_model ---------------------------------------------------------------------------

def first_key_length(value):
    """The valid file with the first metadata key's length field set to `value` (the key's bytes unchanged)."""
    data = bytearray(rm.gguf_model())
    data[24:32] = value.to_bytes(8, "little")
    return bytes(data)


def read_everything(path):
    """GGUFFile opened and everything it hands out touched, as a user would."""
    from flashlm.gguf import GGUFFile

    with GGUFFile(path) as f:
        _ = f.metadata, f.metadata_types
        for t in f.tensors:
            f.load(t.name)
        return len(f.tensors), len(f.metadata)


N_TENSORS, N_KV = len(rm.gguf_tensors()), len(rm.gguf_metadata())


def gguf_reader_cases():
    entry = "flashlm.gguf.GGUFFile"
    at = ("at byte",)
    files = [
        ("tensor count 2**63", rm.gguf_model(n_tensors=1 << 63), at),
        (f"tensor count {N_TENSORS} + 2**32", rm.gguf_model(n_tensors=N_TENSORS + (1 << 32)), at),
        ("metadata count 2**40", rm.gguf_model(n_kv=1 << 40), at),
        (f"metadata count {N_KV} + 2**32", rm.gguf_model(n_kv=N_KV + (1 << 32)), at),
        ("the first key's length 2**63", first_key_length(1 << 63), at),
        ("the first key's length 20 + 2**32", first_key_length(20 + (1 << 32)), at),
        ("two tensors' data at the same offset (overlapping)", rm.gguf_model(offsets={"blk.0.attn_v.weight": 0}),
         at + ("blk.0.attn_v.weight", "overlap")),
        ("a tensor's offset 2**64 - 32", rm.gguf_model(offsets={"output_norm.weight": (1 << 64) - 32}),
         at + ("output_norm.weight",)),
        ("truncated inside the tensor data", rm.gguf_model()[:-100], at),
        ("a tensor's dims [32, 2**32 + 300] (an int32 wrap gives 300)",
         rm.gguf_model(tensors={"token_embd.weight": ((rm.D, rm.GGUF_VOCAB + (1 << 32)), gb.F32, b"")}),
         at + ("token_embd.weight",)),
    ]
    cases = [Case(entry, "a valid file", lambda: read_everything(write(rm.gguf_model())), judge=lambda r: (
        None if r == (N_TENSORS, N_KV) else f"read {r!r}, expected {(N_TENSORS, N_KV)}"), expect="either")]
    cases += [Case(entry, what, lambda data=data: read_everything(write(data)), names) for what, data, names in files]
    for what, path in (("None", lambda: None), ("an int", lambda: 3), ("a directory", robust.scratch),
                       ("a missing file", lambda: os.path.join(robust.scratch(), "missing.gguf"))):
        cases.append(Case(entry, f"path: {what}", lambda path=path: read_everything(path()), ("path", "file"),
                          accept=(OSError,)))
    return cases


def load_tensor(name="blk.0.attn_q.weight", **kw):
    """GGUFFile(valid file).load(name, **kw)."""
    def call():
        from flashlm.gguf import GGUFFile

        with GGUFFile(write(rm.gguf_model())) as f:
            return f.load(name, **kw)
    return call


def tensor_load_cases():
    entry = "flashlm.gguf.GGUFFile.load"
    shape = (rm.D, rm.D)

    def has_shape(t):
        return None if isinstance(t, torch.Tensor) and tuple(t.shape) == shape else f"returned {robust.describe(t)}"
    return [
        value_case(entry, "a valid call", load_tensor(), (), has_shape),
        Case(entry, "dtype: torch.int32", load_tensor(dtype=torch.int32), ("dtype", "out_dtype")),
        Case(entry, "dtype: 'float32' (a string)", load_tensor(dtype="float32"), ("dtype", "out_dtype")),
        Case(entry, "device: 'tpu'", load_tensor(device="tpu"), ("device",)),
        Case(entry, "device: 'cuda' (no GPU here)", load_tensor(device="cuda"), ("device",)),
        value_case(entry, "device: 'meta'", load_tensor(device="meta"), ("device",), lambda t: (
            None if isinstance(t, torch.Tensor) and t.is_meta and tuple(t.shape) == shape
            else f"returned {robust.describe(t)}")),
        Case(entry, "name: a missing tensor", load_tensor("nope"), ("nope", "name"), accept=(KeyError,)),
        Case(entry, "name: None", load_tensor(None), ("name",), accept=(KeyError,)),
    ]


def meta(key, vtype, value):
    return {key: (vtype, value)}


GGUF_META = [
    # (what, metadata change, names the error may use)
    ("llama.block_count = 2**31", meta("llama.block_count", gb.UINT32, 1 << 31), ()),
    ("llama.block_count = 2 + 2**32 (UINT64)", meta("llama.block_count", gb.UINT64, 2 + (1 << 32)), ()),
    ("llama.block_count = 2**63 (UINT64)", meta("llama.block_count", gb.UINT64, 1 << 63), ()),
    ("llama.block_count = 0", meta("llama.block_count", gb.UINT32, 0), ()),
    ("llama.block_count = 3 (the file has 2 blocks)", meta("llama.block_count", gb.UINT32, 3), ("blk.2",)),
    ("llama.block_count = -2 (INT32)", meta("llama.block_count", gb.INT32, -2), ()),
    ("llama.block_count a string", meta("llama.block_count", gb.STRING, "2"), ()),
    ("llama.block_count missing", {"llama.block_count": None}, ()),
    ("llama.attention.head_count = 0", meta("llama.attention.head_count", gb.UINT32, 0), ()),
    ("llama.attention.head_count = 3 (32 columns)", meta("llama.attention.head_count", gb.UINT32, 3),
     ("llama.embedding_length",)),
    ("llama.attention.head_count = 4 + 2**32 (UINT64)", meta("llama.attention.head_count", gb.UINT64, 4 + (1 << 32)),
     ("llama.embedding_length",)),
    ("llama.attention.head_count_kv = 3", meta("llama.attention.head_count_kv", gb.UINT32, 3), ()),
    ("llama.attention.head_count_kv = 0", meta("llama.attention.head_count_kv", gb.UINT32, 0), ()),
    ("llama.embedding_length = 2**31", meta("llama.embedding_length", gb.UINT32, 1 << 31), ("token_embd.weight",)),
    ("llama.embedding_length = 32 + 2**32 (UINT64)", meta("llama.embedding_length", gb.UINT64, 32 + (1 << 32)),
     ("token_embd.weight",)),
    ("llama.feed_forward_length = 2**40 (UINT64)", meta("llama.feed_forward_length", gb.UINT64, 1 << 40),
     ("blk.0.ffn_gate.weight",)),
    ("llama.feed_forward_length = 64 + 2**32 (UINT64)", meta("llama.feed_forward_length", gb.UINT64, 64 + (1 << 32)),
     ("blk.0.ffn_gate.weight",)),
    ("llama.context_length = 2**63 (UINT64)", meta("llama.context_length", gb.UINT64, 1 << 63), ("max_model_len",)),
    ("llama.context_length = 0", meta("llama.context_length", gb.UINT32, 0), ()),
    ("llama.rope.freq_base = nan", meta("llama.rope.freq_base", gb.FLOAT32, math.nan), ()),
    ("llama.rope.freq_base = inf", meta("llama.rope.freq_base", gb.FLOAT32, math.inf), ()),
    ("llama.rope.freq_base = -1", meta("llama.rope.freq_base", gb.FLOAT32, -1.0), ()),
    ("llama.attention.layer_norm_rms_epsilon = nan", meta("llama.attention.layer_norm_rms_epsilon", gb.FLOAT32,
                                                          math.nan), ()),
    ("llama.rope.dimension_count = 2**31", meta("llama.rope.dimension_count", gb.UINT32, 1 << 31), ()),
    ("llama.vocab_size = 2**40 (UINT64)", meta("llama.vocab_size", gb.UINT64, 1 << 40), ("token_embd.weight",)),
    ("general.architecture = 'falcon'", meta("general.architecture", gb.STRING, "falcon"), ()),
    ("general.architecture a UINT32", meta("general.architecture", gb.UINT32, 7), ()),
    ("tokenizer.ggml.tokens one token short", meta("tokenizer.ggml.tokens", gb.ARRAY, (
        gb.STRING, [f"t{i}" for i in range(rm.GGUF_VOCAB - 1)])), ("token_embd.weight",)),
    ("tokenizer.ggml.tokens of INT32", meta("tokenizer.ggml.tokens", gb.ARRAY, (gb.INT32, list(range(rm.GGUF_VOCAB)))),
     ()),
    ("tokenizer.ggml.token_type one entry short", meta("tokenizer.ggml.token_type", gb.ARRAY, (
        gb.INT32, [1] * (rm.GGUF_VOCAB - 1))), ()),
    (f"tokenizer.ggml.eos_token_id = {rm.GGUF_VOCAB} (out of the vocabulary)",
     meta("tokenizer.ggml.eos_token_id", gb.UINT32, rm.GGUF_VOCAB), ()),
    ("tokenizer.ggml.eos_token_id = 2**32 (UINT64; an int32 wrap gives 0)",
     meta("tokenizer.ggml.eos_token_id", gb.UINT64, 1 << 32), ()),
    ("tokenizer.ggml.bos_token_id = -1 (INT32)", meta("tokenizer.ggml.bos_token_id", gb.INT32, -1), ()),
    ("tokenizer.ggml.eos_token_id a string", meta("tokenizer.ggml.eos_token_id", gb.STRING, "0"), ()),
    ("tokenizer.ggml.merges holding 'nonsense'", meta("tokenizer.ggml.merges", gb.ARRAY, (gb.STRING, ["nonsense"])),
     ()),
    ("tokenizer.ggml.model = 'bert' (no tokenizer.ggml.unknown_token_id)",
     meta("tokenizer.ggml.model", gb.STRING, "bert"), ("tokenizer.ggml.unknown_token_id",)),
    ("tokenizer.ggml.model = 'rwkv'", meta("tokenizer.ggml.model", gb.STRING, "rwkv"), ()),
    ("tokenizer.ggml.pre = 'unknown'", meta("tokenizer.ggml.pre", gb.STRING, "unknown"), ()),
]


def matrix(rows, cols, ggml_type=gb.F32, dtype=np.float32):
    return (cols, rows), ggml_type, np.zeros((rows, cols), dtype)


GGUF_TENSORS = [
    # (what, gguf_model keyword arguments, the tensor the error names)
    ("blk.1.ffn_up.weight missing", dict(drop=("blk.1.ffn_up.weight",)), "blk.1.ffn_up.weight"),
    ("blk.0.attn_k.weight of 32 rows (the metadata implies 16)",
     dict(tensors={"blk.0.attn_k.weight": matrix(32, rm.D)}), "blk.0.attn_k.weight"),
    ("blk.0.attn_v.weight of I32", dict(tensors={"blk.0.attn_v.weight": matrix(16, rm.D, gb.I32, np.int32)}),
     "blk.0.attn_v.weight"),
    ("an extra blk.2.attn_norm.weight", dict(tensors={"blk.2.attn_norm.weight": ((rm.D,), gb.F32, np.ones(rm.D, np.float32))}),
     "blk.2.attn_norm.weight"),
    ("token_embd.weight 1-dim", dict(tensors={"token_embd.weight": ((rm.D * rm.GGUF_VOCAB,), gb.F32,
                                                                     np.zeros(rm.D * rm.GGUF_VOCAB, np.float32))}),
     "token_embd.weight"),
    ("output_norm.weight with 31 values", dict(tensors={"output_norm.weight": ((31,), gb.F32, np.ones(31, np.float32))}),
     "output_norm.weight"),
]


def gguf_load_cases():
    entry = "flashlm.io.load_model (GGUF)"
    cases = [Case(entry, "a valid file", load(lambda: write(rm.gguf_model())), (), "either",
                  judge=loads_model(rm.LAYERS, rm.GGUF_VOCAB))]
    for what, change, extra in GGUF_META:
        key = next(iter(change))
        cases.append(Case(entry, what, load(lambda change=change: write(rm.gguf_model(meta=change))), (key,) + extra))
    for what, kw, name in GGUF_TENSORS:
        cases.append(Case(entry, what, load(lambda kw=kw: write(rm.gguf_model(**kw))), (name,)))
    cases += [
        Case(entry, "max_model_len = 2**31 (llama.context_length 64)", load(lambda: write(rm.gguf_model()),
             max_model_len=1 << 31), (), "either", judge=loads_model(rm.LAYERS, rm.GGUF_VOCAB)),
        Case(entry, "max_model_len = 0", load(lambda: write(rm.gguf_model()), max_model_len=0), ("max_model_len",)),
        Case(entry, "max_model_len = '64'", load(lambda: write(rm.gguf_model()), max_model_len="64"),
             ("max_model_len",)),
        Case(entry, "an empty file", load(lambda: write(b"")), ("at byte", "path")),
        Case(entry, "a text file", load(lambda: write(b"hello, world\n")), ("at byte", "path")),
    ]
    return cases


# -- HF directories --------------------------------------------------------------------------------------------

HF_CONFIG = [
    # (what, config.json change, names the error may use besides the key)
    ("num_hidden_layers = 2**31", {"num_hidden_layers": 1 << 31}, ()),
    ("num_hidden_layers = 2 + 2**32", {"num_hidden_layers": 2 + (1 << 32)}, ()),
    ("num_hidden_layers = 3 (the weights have 2)", {"num_hidden_layers": 3}, ("model.layers.2", "blocks.2")),
    ("num_hidden_layers = 0", {"num_hidden_layers": 0}, ()),
    ("num_hidden_layers = 2.0", {"num_hidden_layers": 2.0}, ()),
    ("num_hidden_layers = '2'", {"num_hidden_layers": "2"}, ()),
    ("num_hidden_layers = true", {"num_hidden_layers": True}, ()),
    ("num_attention_heads = 0", {"num_attention_heads": 0}, ()),
    ("num_attention_heads = 3", {"num_attention_heads": 3}, ("hidden_size",)),
    ("num_key_value_heads = 3", {"num_key_value_heads": 3}, ()),
    ("num_key_value_heads = 0", {"num_key_value_heads": 0}, ()),
    ("hidden_size = 2**31", {"hidden_size": 1 << 31}, ("model.embed_tokens.weight",)),
    ("vocab_size = 2**40", {"vocab_size": 1 << 40}, ("model.embed_tokens.weight",)),
    ("intermediate_size = -1", {"intermediate_size": -1}, ()),
    ("max_position_embeddings = 2**62", {"max_position_embeddings": 1 << 62}, ("max_model_len",)),
    ("rope_theta = NaN", {"rope_theta": math.nan}, ()),
    ("rope_theta = -1", {"rope_theta": -1}, ()),
    ("rms_norm_eps = NaN", {"rms_norm_eps": math.nan}, ()),
    ("architectures a string", {"architectures": "LlamaForCausalLM"}, ()),
    ("architectures missing", {"architectures": None}, ()),
    ("eos_token_id = 2**40 (out of the vocabulary)", {"eos_token_id": 1 << 40}, ("eos_token_ids",)),
    ("eos_token_id = -1", {"eos_token_id": -1}, ("eos_token_ids",)),
    ("eos_token_id = '1'", {"eos_token_id": "1"}, ("eos_token_ids",)),
]


def hf_load(**kw):
    return load(lambda: rm.hf_dir(robust.scratch(), **kw))


def hf_cases():
    entry = "flashlm.io.load_model (HF directory)"
    cases = [Case(entry, "a valid directory", hf_load(), (), "either", judge=loads_model(rm.LAYERS, rm.VOCAB))]
    for what, change, extra in HF_CONFIG:
        key = next(iter(change))
        cases.append(Case(entry, f"config.json: {what}", hf_load(config=change), (key,) + extra))
    weight = "model.layers.0.self_attn.k_proj.weight"
    cases += [Case(entry, what, hf_load(**kw), names) for what, kw, names in [
        ("model.norm.weight missing", dict(drop=("model.norm.weight",)), ("model.norm.weight", "final_norm.weight")),
        (f"{weight} of shape [32, 32]", dict(weights={weight: torch.zeros(32, 32)}), (weight, "blocks.0.attn.k.weight")),
        (f"{weight} of int32", dict(weights={weight: torch.zeros(16, 32, dtype=torch.int32)}), (weight,)),
        ("an extra model.layers.2.mlp.up_proj.weight", dict(weights={"model.layers.2.mlp.up_proj.weight": torch.zeros(4)}),
         ("model.layers.2.mlp.up_proj.weight",)),
        ("config.json not JSON", dict(files={"config.json": "{not json"}), ("config.json",)),
        ("config.json a list", dict(files={"config.json": "[1, 2]"}), ("config.json",)),
        ("config.json holding NaN", dict(files={"config.json": json.dumps(rm.hf_config()).replace(
            '"rope_theta": 10000.0', '"rope_theta": NaN')}), ("rope_theta", "config.json")),
        ("model.safetensors an empty file", dict(files={"model.safetensors": b""}), ("model.safetensors",)),
        ("model.safetensors whose header claims 2**62 bytes", dict(files={"model.safetensors": (1 << 62).to_bytes(
            8, "little") + b"{}"}), ("model.safetensors",)),
        ("model.safetensors whose header is not JSON", dict(files={"model.safetensors": (8).to_bytes(8, "little")
                                                                   + b"not json"}), ("model.safetensors",)),
        ("a sharded index naming a shard outside the directory", dict(files={
            "model.safetensors.index.json": json.dumps({"weight_map": {"model.norm.weight": "../../outside.safetensors"}}),
            "model.safetensors": None}), ("model.safetensors.index.json", "outside.safetensors")),
        ("generation_config.json: eos_token_id = 2**40", dict(files={"generation_config.json": json.dumps(
            {"eos_token_id": 1 << 40})}), ("eos_token_id", "eos_token_ids", "generation_config.json")),
        ("tokenizer.json not a tokenizer", dict(files={"tokenizer.json": "{}"}), ("tokenizer.json",)),
        ("tokenizer.json of 1000 tokens (the model has 300)", dict(files={"tokenizer.json": rm.word_tokenizer_json(1000)}),
         ("tokenizer.json", "vocab_size")),
    ]]
    return cases


# -- training checkpoints --------------------------------------------------------------------------------------

def ckpt_load(edit=None, folder=False):
    def path():
        d = robust.scratch()
        if folder:
            d = os.path.join(d, "run")
            os.makedirs(d)
            rm.checkpoint(os.path.join(d, "ckpt-00000003.pt"), edit)
            return d
        return rm.checkpoint(os.path.join(d, "ckpt.pt"), edit)
    return load(path)


def set_config(**changes):
    return lambda state: state["model_config"].update(changes)


def checkpoint_cases():
    entry = "flashlm.io.load_model (checkpoint)"
    cases = [Case(entry, "a valid checkpoint", ckpt_load(), (), "either", judge=loads_model(rm.LAYERS, rm.VOCAB)),
             Case(entry, "a valid run folder", ckpt_load(folder=True), (), "either",
                  judge=loads_model(rm.LAYERS, rm.VOCAB))]
    w = "blocks.0.attn.k.weight"
    edits = [
        ("model_config.n_layer = 2**31", set_config(n_layer=1 << 31), ("n_layer",)),
        ("model_config.n_layer = 2 + 2**32", set_config(n_layer=2 + (1 << 32)), ("n_layer",)),
        ("model_config.n_layer = 3 (the weights have 2)", set_config(n_layer=3), ("blocks.2", "model_config")),
        ("model_config.n_head = 3", set_config(n_head=3), ("n_head", "n_kv_head", "d_model")),
        ("model_config.d_model = 2**40", set_config(d_model=1 << 40), ("d_model", "tok_emb.weight", "model_config")),
        ("model_config.vocab_size = 2**40", set_config(vocab_size=1 << 40), ("vocab_size", "tok_emb.weight",
                                                                             "model_config")),
        ("model_config.seq_len = 2**62", set_config(seq_len=1 << 62), ("seq_len", "max_model_len", "model_config")),
        ("model_config.arch = 'falcon'", set_config(arch="falcon"), ("arch",)),
        ("model_config.n_layer = '2'", set_config(n_layer="2"), ("n_layer",)),
        ("model_config.rope_theta = nan", set_config(rope_theta=math.nan), ("rope_theta",)),
        ("model_config.norm_eps = nan", set_config(norm_eps=math.nan), ("norm_eps",)),
        ("model_config with an unknown key", set_config(n_experts=8), ("n_experts", "model config", "model_config")),
        ("model_config missing", lambda s: s.pop("model_config"), ("model_config",)),
        ("model_config a list", lambda s: s.update(model_config=[1, 2]), ("model_config",)),
        ("model missing", lambda s: s.pop("model"), ("model",)),
        ("model a tensor", lambda s: s.update(model=torch.zeros(3)), ("model",)),
        (f"{w} of shape [32, 32]", lambda s: s["model"].update({w: torch.zeros(32, 32)}), (w,)),
        (f"{w} missing", lambda s: s["model"].pop(w), (w,)),
        (f"{w} of int64", lambda s: s["model"].update({w: torch.zeros(16, 32, dtype=torch.int64)}), (w,)),
        (f"eos_token_id = {rm.VOCAB} (out of the vocabulary)", lambda s: s.update(eos_token_id=rm.VOCAB),
         ("eos_token_id", "eos_token_ids")),
        ("eos_token_id = 2**63", lambda s: s.update(eos_token_id=1 << 63), ("eos_token_id", "eos_token_ids")),
        ("eos_token_id = -1", lambda s: s.update(eos_token_id=-1), ("eos_token_id", "eos_token_ids")),
        ("eos_token_id = '1'", lambda s: s.update(eos_token_id="1"), ("eos_token_id", "eos_token_ids")),
        ("tokenizer not a tokenizer", lambda s: s.update(tokenizer="{not a tokenizer"), ("tokenizer",)),
        ("tokenizer of 1000 tokens (the model has 300)", lambda s: s.update(tokenizer=rm.word_tokenizer_json(1000)),
         ("tokenizer", "vocab_size")),
        ("format 'other'", lambda s: s.update(format="other"), ("format", "checkpoint")),
    ]
    cases += [Case(entry, what, ckpt_load(edit), names) for what, edit, names in edits]

    def file_data(data):
        return load(lambda: write(data, "ckpt.pt"))

    def truncated():
        path = rm.checkpoint(os.path.join(robust.scratch(), "ckpt.pt"))
        with open(path, "rb") as f:
            data = f.read()
        return write(data[: len(data) // 2], "ckpt.pt")

    cases += [
        Case(entry, "truncated to half", load(truncated), ("checkpoint",)),
        Case(entry, "'PK' and garbage", file_data(b"PK\x03\x04" + bytes(range(256)) * 4), ("checkpoint",)),
        Case(entry, "a run folder with no checkpoint", load(robust.scratch), ("checkpoint", "path")),
        Case(entry, "a pickled object that is not weights", load(lambda: _pickled_code()), ("checkpoint",)),
    ]
    return cases


def _pickled_code() -> str:
    """A torch.save of a dict holding a plain Python object: weights_only loading must refuse it."""
    path = os.path.join(robust.scratch(), "ckpt.pt")
    state = rm.checkpoint_state()
    state["extra"] = argparse.Namespace(step=3)  # a class weights_only loading does not allow
    torch.save(state, path)
    return path


# -- seeded random metadata values -----------------------------------------------------------------------------

INTERESTING = {
    gb.UINT32: [0, 1, 3, 255, 1 << 31, (1 << 32) - 1],
    gb.FLOAT32: [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e38],
    gb.STRING: ["", "x" * 5000, "llama\x00", "qwen2", "gpt2", "\u00e9\u00e9"],
}


def random_value(rng, vtype, value):
    """A hostile replacement for a metadata value of type `vtype`: an interesting value of the same type,
    another type (UINT64 past int32, a negative INT32, a string, a float, a bool), or an array cut or grown."""
    if vtype == gb.ARRAY:
        elem_type, items = value
        choice = rng.randrange(4)
        if choice == 0:
            return gb.ARRAY, (elem_type, [])
        if choice == 1:
            return gb.ARRAY, (elem_type, items[: rng.randrange(len(items))])
        if choice == 2:
            return gb.ARRAY, (elem_type, items + items[:3])
        return gb.ARRAY, (gb.UINT32 if elem_type != gb.UINT32 else gb.STRING,
                          [0] * len(items) if elem_type != gb.UINT32 else ["0"] * len(items))
    if rng.random() < 0.5 and vtype in INTERESTING:
        return vtype, rng.choice(INTERESTING[vtype])
    return rng.choice([(gb.UINT64, (1 << 32) + 2), (gb.INT32, -1), (gb.STRING, "2"), (gb.FLOAT32, 2.5), (gb.BOOL, True),
                       (gb.UINT64, 1 << 63)])


def random_field_cases(seeds=range(40)):
    entry = "flashlm.io.load_model (GGUF, a random metadata value)"
    valid = rm.gguf_metadata()
    cases = []
    for seed in seeds:
        rng = random.Random(seed)
        key = rng.choice(sorted(valid))
        vtype, value = random_value(rng, *valid[key])
        change = {key: (vtype, value)}
        shown = repr(value[1][:3]) + "..." if vtype == gb.ARRAY else repr(value)[:40]
        # Any load, or an accepted exception (its wording is not checked: the key may surface as a tensor).
        cases.append(value_case(entry, f"seed {seed}: {key} = {shown} (type {vtype})",
                                load(lambda change=change: write(rm.gguf_model(meta=change))), (), lambda r: None))
    return cases


CASES = gguf_reader_cases() + tensor_load_cases() + gguf_load_cases() + hf_cases() + checkpoint_cases() + random_field_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
