"""`flashlm quantize` (flashlm.io.quantize_file): a small llama-style model, written with gguf-py, is
quantized with several mixes and read back with gguf-py's GGUFReader.

Checked: every tensor's type against llama.cpp's mix rules, worked out by hand below for this model
(8 layers, so use_more_bits picks layers 0, 3, 6 and 7; ffn rows of 288, which no 256-block divides, so
ffn_down falls back to a 32-block type); the bytes against quantize_gguf of the same weights; the
dequantized values against the originals within the per-type error bounds of test_gguf_quantize; the
metadata copied and general.file_type set. Also: already-quantized inputs, an HF safetensors directory
(names, q/k rope permutation, hyperparameters, its tokenizer.json), and the command line.
"""

import json
import os
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from flashlm.cli import main as cli_main
from flashlm.quant import quantize_gguf
from flashlm.io.quantize_file import quantize_file
from test_gguf_quantize import RMS_BOUNDS

N_LAYER, HIDDEN, FFN, VOCAB, N_HEAD, N_HEAD_KV = 8, 256, 288, 64, 4, 2
MORE_BITS = {0, 3, 6, 7}  # use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2


def model_tensors(rng):
    """{gguf name: float32 array in torch order}, in file order."""
    t = {"token_embd.weight": rng.standard_normal((VOCAB, HIDDEN))}
    kv = HIDDEN // N_HEAD * N_HEAD_KV
    for i in range(N_LAYER):
        t[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        t[f"blk.{i}.attn_q.weight"] = rng.standard_normal((HIDDEN, HIDDEN))
        t[f"blk.{i}.attn_k.weight"] = rng.standard_normal((kv, HIDDEN))
        t[f"blk.{i}.attn_v.weight"] = rng.standard_normal((kv, HIDDEN))
        t[f"blk.{i}.attn_output.weight"] = rng.standard_normal((HIDDEN, HIDDEN))
        t[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        t[f"blk.{i}.ffn_gate.weight"] = rng.standard_normal((FFN, HIDDEN))
        t[f"blk.{i}.ffn_up.weight"] = rng.standard_normal((FFN, HIDDEN))
        t[f"blk.{i}.ffn_down.weight"] = rng.standard_normal((HIDDEN, FFN))
    t["output_norm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
    t["output.weight"] = rng.standard_normal((VOCAB, HIDDEN))
    return {k: (0.02 * v if v.ndim == 2 else v).astype(np.float32) for k, v in t.items()}


def write_model(path, tensors, stored=None, alignment=None, n_head=N_HEAD, n_layer=N_LAYER, extra=()):
    """A GGUF file of `tensors`; `stored` maps names to a storage type other than F32 (F16, BF16, Q8_0);
    extra: more metadata, [(key, value, GGUFValueType, item type)]."""
    stored = stored or {}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value, vtype, sub in extra:
        w.add_key_value(key, value, vtype, sub_type=sub)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("tiny")
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(n_head)
    w.add_head_count_kv(N_HEAD_KV if n_head % N_HEAD_KV == 0 else 1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    for name, x in tensors.items():
        kind = stored.get(name, "F32")
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            raw = gguf.quants.quantize(x, GQT[kind])
            w.add_tensor(name, raw, raw_dtype=GQT[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def expected_types(mix):
    """Hand-derived from llama.cpp's llama_tensor_get_type for this model."""
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}.get(mix, mix)
    fallback = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
    float_mix = mix in ("F16", "BF16", "F32")
    out = {}
    for name in model_tensors(np.random.default_rng(0)):
        if name.endswith("norm.weight"):
            out[name] = "F32"
            continue
        t = base
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if float_mix:
            pass
        elif name == "output.weight":
            t = "Q8_0" if base == "Q8_0" else "Q6_K"
        elif name.endswith("attn_v.weight"):
            if mix in ("Q4_K_M", "Q5_K_M") and layer in MORE_BITS:
                t = "Q6_K"
            elif mix == "Q4_K_S" and layer < 4:
                t = "Q5_K"
            elif mix == "Q3_K_M":
                t = "Q5_K" if layer < 2 else "Q4_K"
            elif mix == "Q2_K":
                t = "Q3_K"  # n_head / n_head_kv = 2 < 4
        elif name.endswith("ffn_down.weight"):
            if mix in ("Q4_K_M", "Q5_K_M") and layer in MORE_BITS:
                t = "Q6_K"
            elif mix == "Q4_K_S" and layer < 1:
                t = "Q5_K"
            elif mix == "Q3_K_M":
                t = "Q4_K"  # layer >= 8 / 16 = 0 and not falcon
            elif mix == "Q2_K":
                t = "Q3_K"
            elif mix in ("IQ4_NL", "IQ4_XS") and layer < 1:  # without an imatrix
                t = "Q5_K"
            if FFN % gguf.GGML_QUANT_SIZES[GQT[t]][0]:
                t = fallback[t]
        elif name.endswith("attn_output.weight"):
            t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(mix, t)
        out[name] = t
    return out


def rel_rms(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def read_back(path):
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type.name, shape, np.asarray(t.data))
    return r, out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tensors = model_tensors(np.random.default_rng(7))
    path = tmp_path_factory.mktemp("model") / "tiny-f32.gguf"
    write_model(path, tensors)
    return path, tensors


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "Q4_0", "Q8_0", "Q6_K", "IQ4_XS",
                                 "IQ4_NL", "F16"])
def test_mix_types_bytes_and_values(model, tmp_path, mix):
    src, tensors = model
    out = tmp_path / f"tiny-{mix}.gguf"
    report = quantize_file(str(src), str(out), mix, progress=False)
    reader, back = read_back(out)
    want = expected_types(mix)
    got = {name: t for name, (t, _, _) in back.items()}
    assert got == want, {n: (got.get(n), want[n]) for n in want if got.get(n) != want[n]}
    assert [name for name, _, _ in report] == list(tensors)
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[
        "ALL_F32" if mix == "F32" else f"MOSTLY_{mix}"])
    assert reader.get_field("llama.block_count").contents() == N_LAYER
    assert reader.get_field("tokenizer.ggml.tokens").contents()[:2] == ["t0", "t1"]
    for name, x in tensors.items():
        t, shape, data = back[name]
        assert shape == x.shape, (name, shape, x.shape)
        if t == "F32":
            assert np.array_equal(data.reshape(x.shape), x), name
            continue
        rows = x.reshape(-1, x.shape[-1])
        assert np.array_equal(data.reshape(rows.shape[0], -1).view(np.uint8), quantize_gguf(rows, t)), name
        err = rel_rms(gguf.quants.dequantize(data, GQT[t]).reshape(x.shape), x)
        assert err <= RMS_BOUNDS[t], f"{name} ({t}): relative RMS error {err:.4g} > {RMS_BOUNDS[t]}"


def test_flashlm_reads_what_it_wrote(model, tmp_path):
    # flashlm's own reader and dequantizer decode the written file exactly as gguf-py does
    from flashlm.gguf import GGUFFile

    src, tensors = model
    out = tmp_path / "q5km.gguf"
    quantize_file(str(src), str(out), "Q5_K_M", progress=False)
    _, back = read_back(out)
    with GGUFFile(str(out)) as f:
        for name in tensors:
            t, shape, data = back[name]
            want = data.reshape(shape) if t == "F32" else gguf.quants.dequantize(data, GQT[t]).reshape(shape)
            assert np.array_equal(f.load(name).numpy(), want), name


def test_tied_embeddings_and_stored_types(tmp_path):
    # no output.weight: token_embd is the output projection and gets Q6_K; F16/Q8_0 inputs are accepted,
    # a Q8_0 input is decoded and quantized again (with a warning), a kept norm stays F32
    tensors = model_tensors(np.random.default_rng(3))
    del tensors["output.weight"]
    stored = {"blk.0.attn_q.weight": "F16", "blk.1.attn_q.weight": "Q8_0"}
    src = tmp_path / "in.gguf"
    write_model(src, tensors, stored, alignment=64)  # and a custom alignment, kept
    out = tmp_path / "out.gguf"
    with pytest.warns(UserWarning, match="1 tensors are already quantized"):
        quantize_file(str(src), str(out), "Q4_K_M", progress=False)
    reader, back = read_back(out)
    assert reader.alignment == 64 and reader.get_field("general.alignment").contents() == 64
    assert all(t.data_offset % 64 == 0 for t in reader.tensors)
    assert back["token_embd.weight"][0] == "Q6_K"
    for name in stored:
        t, _, data = back[name]
        assert t == "Q4_K"
        x = tensors[name]
        err = rel_rms(gguf.quants.dequantize(data, GQT[t]).reshape(x.shape), x)
        assert err <= RMS_BOUNDS["Q4_K"] * 1.1, (name, err)  # Q8_0's own error (~0.005) adds in quadrature


def test_metadata_of_every_type_is_copied(tmp_path):
    # read by flashlm's reader and written by gguf-py's writer: each value keeps its type
    from flashlm.gguf import GGUFFile

    VT = gguf.GGUFValueType
    extra = [(f"x.{t.name.lower()}", v, t, None) for t, v in [
        (VT.UINT8, 200), (VT.INT8, -100), (VT.UINT16, 60000), (VT.INT16, -30000), (VT.UINT32, 2**32 - 1),
        (VT.INT32, -2**31), (VT.FLOAT32, 1.5), (VT.BOOL, True), (VT.STRING, "tïny ✓"), (VT.UINT64, 2**64 - 1),
        (VT.INT64, -2**63), (VT.FLOAT64, 0.1)]]
    extra += [("x.ints", [1, -2, 3], VT.ARRAY, VT.INT32), ("x.floats", [0.5, -1.0], VT.ARRAY, VT.FLOAT32),
              ("x.strings", ["a", "b\nc"], VT.ARRAY, VT.STRING)]
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_model(src, model_tensors(np.random.default_rng(1)), extra=extra)
    quantize_file(str(src), str(out), "Q8_0", progress=False)
    with GGUFFile(str(src)) as a, GGUFFile(str(out)) as b:
        for key, _, _, _ in extra:
            assert (b.metadata[key], b.metadata_types[key]) == (a.metadata[key], a.metadata_types[key]), key
        kept = set(a.metadata) - {"general.file_type"}
        assert all(b.metadata[k] == a.metadata[k] for k in kept), kept


def test_same_type_is_copied(model, tmp_path):
    src, tensors = model
    q8 = tmp_path / "q8.gguf"
    quantize_file(str(src), str(q8), "Q8_0", progress=False)
    again = tmp_path / "q8-again.gguf"
    quantize_file(str(q8), str(again), "Q8_0", progress=False)
    _, a = read_back(q8)
    _, b = read_back(again)
    for name in tensors:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][2], b[name][2]), name


def _write_safetensors(path, arrays):
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in arrays.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def tiny_tokenizer():
    """A byte-level BPE of 30 tokens and <|endoftext|> (id 30): fewer ids than the model's 64 rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + ["\u0120", "th", "the", "\u0120the"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("th", "e"), ("\u0120", "the")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def test_hf_llama_directory(tmp_path):
    rng = np.random.default_rng(11)
    kv = HIDDEN // N_HEAD * N_HEAD_KV
    hf = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)), "model.norm.weight": np.ones(HIDDEN),
          "lm_head.weight": rng.standard_normal((VOCAB, HIDDEN))}
    for i in range(2):
        p = f"model.layers.{i}."
        hf |= {p + "self_attn.q_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)),
               p + "self_attn.k_proj.weight": rng.standard_normal((kv, HIDDEN)),
               p + "self_attn.v_proj.weight": rng.standard_normal((kv, HIDDEN)),
               p + "self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)),
               p + "mlp.gate_proj.weight": rng.standard_normal((FFN, HIDDEN)),
               p + "mlp.up_proj.weight": rng.standard_normal((FFN, HIDDEN)),
               p + "mlp.down_proj.weight": rng.standard_normal((HIDDEN, FFN)),
               p + "input_layernorm.weight": np.ones(HIDDEN), p + "post_attention_layernorm.weight": np.ones(HIDDEN)}
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    bf16 = torch.from_numpy(hf["model.layers.0.mlp.up_proj.weight"]).to(torch.bfloat16)
    arrays = {k: ("F32", v) for k, v in hf.items()}
    arrays["model.layers.0.mlp.up_proj.weight"] = ("BF16", bf16.view(torch.int16).numpy())
    _write_safetensors(model_dir / "model.safetensors", arrays)
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": VOCAB}))
    tok = tiny_tokenizer()
    (model_dir / "tokenizer.json").write_text(tok.to_str())
    out = tmp_path / "hf-q8.gguf"
    quantize_file(str(model_dir), str(out), "Q8_0", progress=False)
    reader, back = read_back(out)
    # the tokenizer, padded to the embedding's 64 rows
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokens == [tok.id_to_token(i) for i in range(31)] + [f"[PAD{i}]" for i in range(31, VOCAB)]
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.ggml.merges").contents() == ["t h", "th e", "\u0120 the"]
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 30
    assert reader.get_field("tokenizer.ggml.token_type").contents()[29:32] == [1, 3, 5]
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.attention.head_count_kv").contents() == N_HEAD_KV
    assert reader.get_field("llama.rope.dimension_count").contents() == HIDDEN // N_HEAD
    assert abs(reader.get_field("llama.rope.freq_base").contents() - 500000.0) < 1e-3
    assert back["blk.1.ffn_down.weight"][0] == "Q8_0" and back["output_norm.weight"][0] == "F32"

    def permuted(w, n_head):  # convert_hf_to_gguf's permute, written out: rows (h, half, i) -> (h, i, half)
        d = w.shape[0] // n_head // 2
        return np.stack([w.reshape(n_head, 2, d, -1)[:, j] for j in range(2)], axis=2).reshape(w.shape)

    def values(name):
        t, shape, data = back[name]
        return gguf.quants.dequantize(data, GQT[t]).reshape(shape)

    q = hf["model.layers.1.self_attn.q_proj.weight"]
    k = hf["model.layers.1.self_attn.k_proj.weight"]
    assert rel_rms(values("blk.1.attn_q.weight"), permuted(q, N_HEAD)) <= RMS_BOUNDS["Q8_0"]
    assert rel_rms(values("blk.1.attn_k.weight"), permuted(k, N_HEAD_KV)) <= RMS_BOUNDS["Q8_0"]
    assert rel_rms(values("blk.1.attn_q.weight"), q) > 0.5  # the permutation did happen
    assert rel_rms(values("blk.0.ffn_up.weight"), bf16.float().numpy()) <= RMS_BOUNDS["Q8_0"]


def test_hf_rope_parameters_give_the_rope_base(tmp_path):
    # transformers 5 writes rope_theta only inside rope_parameters: the GGUF's rope.freq_base is that value
    # (it was 10000, the default, while the rope factors were computed with the real base)
    from flashlm.io import load_gguf
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export import export_hf

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=1, n_head=2, d_model=64, seq_len=64,
                      rope_theta=250000.0, rope_scaling=scaling)
    model_dir = tmp_path / "hf"
    export_hf(Transformer(cfg), cfg, None, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["rope_theta"], config["rope_scaling"]
    assert config["rope_parameters"]["rope_theta"] == 250000.0
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    quantize_file(str(model_dir), str(out), "F32", progress=False)
    reader, _ = read_back(out)
    assert reader.get_field("llama.rope.freq_base").contents() == 250000.0
    loaded = load_gguf(str(out))
    assert loaded.config.rope_theta == 250000.0 and loaded.config.rope_scaling == scaling


def gpt2_directory(path, drop=(), **config):
    """An HF GPT-2 directory (names with the "transformer." prefix some checkpoints have, Conv1D weights stored
    [in, out]) of one block, without the tensors in `drop`, its config.json updated with `config`; and its
    tensors by HF name."""
    rng = np.random.default_rng(12)
    e = HIDDEN
    hf = {"transformer.wte.weight": rng.standard_normal((VOCAB, e)), "transformer.wpe.weight": rng.standard_normal((32, e)),
          "transformer.ln_f.weight": np.ones(e), "transformer.ln_f.bias": np.zeros(e),
          "transformer.h.0.ln_1.weight": np.ones(e), "transformer.h.0.ln_1.bias": np.zeros(e),
          "transformer.h.0.attn.c_attn.weight": rng.standard_normal((e, 3 * e)),
          "transformer.h.0.attn.c_attn.bias": rng.standard_normal(3 * e),
          "transformer.h.0.attn.c_proj.weight": rng.standard_normal((e, e)),
          "transformer.h.0.attn.c_proj.bias": rng.standard_normal(e),
          "transformer.h.0.attn.bias": np.ones((1, 1, 4, 4)),  # the causal-mask buffer: not a weight
          "transformer.h.0.ln_2.weight": np.ones(e), "transformer.h.0.ln_2.bias": np.zeros(e),
          "transformer.h.0.mlp.c_fc.weight": rng.standard_normal((e, 4 * e)),
          "transformer.h.0.mlp.c_fc.bias": rng.standard_normal(4 * e),
          "transformer.h.0.mlp.c_proj.weight": rng.standard_normal((4 * e, e)),
          "transformer.h.0.mlp.c_proj.bias": rng.standard_normal(e)}
    hf = {k: v for k, v in hf.items() if k not in drop}
    path.mkdir()
    _write_safetensors(path / "model.safetensors", {k: ("F32", v.astype(np.float32)) for k, v in hf.items()})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB, "n_layer": 1, "n_embd": e, "n_head": 4, "n_positions": 32,
        "n_ctx": 32, "layer_norm_epsilon": 1e-5, **config}))
    return hf


def test_hf_gpt2_directory(tmp_path):
    model_dir = tmp_path / "gpt2"
    hf = gpt2_directory(model_dir)
    e = HIDDEN
    # a tokenizer llama.cpp's BPE cannot reproduce (WordPiece) is left out, with a warning
    from tokenizers import Tokenizer, models

    (model_dir / "tokenizer.json").write_text(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).to_str())
    out = tmp_path / "gpt2.gguf"
    with pytest.warns(UserWarning, match="WordPiece"):
        quantize_file(str(model_dir), str(out), "Q4_K_M", progress=False)
    reader, back = read_back(out)
    assert reader.get_field("tokenizer.ggml.tokens") is None
    assert reader.get_field("gpt2.feed_forward_length").contents() == 4 * e
    types = {name: t for name, (t, _, _) in back.items()}
    # tied embeddings -> Q6_K; use_more_bits(0, 1) holds -> attn_qkv and ffn_down Q6_K; wpe and 1-D kept
    assert types == {"position_embd.weight": "F32", "token_embd.weight": "Q6_K", "output_norm.weight": "F32",
                     "output_norm.bias": "F32", "blk.0.attn_norm.weight": "F32", "blk.0.attn_norm.bias": "F32",
                     "blk.0.attn_qkv.weight": "Q6_K", "blk.0.attn_qkv.bias": "F32", "blk.0.attn_output.weight": "Q4_K",
                     "blk.0.attn_output.bias": "F32", "blk.0.ffn_norm.weight": "F32", "blk.0.ffn_norm.bias": "F32",
                     "blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_up.bias": "F32", "blk.0.ffn_down.weight": "Q6_K",
                     "blk.0.ffn_down.bias": "F32"}, types
    t, shape, data = back["blk.0.attn_qkv.weight"]
    assert shape == (3 * e, e)
    want = hf["transformer.h.0.attn.c_attn.weight"].T
    assert rel_rms(gguf.quants.dequantize(data, GQT[t]).reshape(shape), want) <= RMS_BOUNDS["Q6_K"]
    # what was written, flashlm loads
    from flashlm.io import load_gguf

    assert load_gguf(str(out)).config.n_layer == 1


@pytest.mark.parametrize("drop, config, match", [
    (("transformer.h.0.mlp.c_proj.bias",), {}, "blk.0.ffn_down.bias' is missing"),
    (("transformer.ln_f.weight", "transformer.ln_f.bias"), {}, "output_norm.weight' is missing"),
    ((), {"n_head": 3}, "n_embd 256 is not a multiple of n_head 3"),
    ((), {"n_head": 0}, "n_head"),
    ((), {"n_layer": 2**31}, "n_layer"),
    ((), {"n_layer": 2}, "config.json: n_layer is 2, but the file holds 1 block, h.0 to h.0"),
], ids=["missing-bias", "missing-output-norm", "heads-3", "heads-0", "layers-2^31", "layers-2"])
def test_hf_directory_the_loader_would_refuse_is_not_written(tmp_path, drop, config, match):
    model_dir = tmp_path / "gpt2"
    gpt2_directory(model_dir, drop, **config)
    out = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=match):
        quantize_file(str(model_dir), str(out), "Q8_0", progress=False)
    assert not out.exists()


@pytest.mark.parametrize("edit, match", [
    ("offsets", r"data \[\d+, \d+\) lies outside the file's \d+ bytes of data"),
    ("entry", "malformed safetensors entry"),
    ("header", "the safetensors header is not JSON"),
])
def test_hf_directory_with_a_malformed_safetensors_file(tmp_path, edit, match):
    model_dir = tmp_path / "gpt2"
    gpt2_directory(model_dir)
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    entry = header["transformer.h.0.ln_1.weight"]
    if edit == "offsets":
        entry["data_offsets"] = [entry["data_offsets"][0] + 2**40, entry["data_offsets"][1] + 2**40]
    elif edit == "entry":
        del entry["dtype"]
    text = json.dumps(header).encode() if edit != "header" else b"{" * n
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=match):
        quantize_file(str(model_dir), str(out), "Q8_0", progress=False)
    assert not out.exists()


def test_a_failure_while_writing_leaves_no_file(model, tmp_path, monkeypatch):
    import flashlm.io.quantize_file as qf

    calls = []

    def failing(rows, target, imatrix=None):
        calls.append(target)
        if len(calls) == 3:
            raise MemoryError("no room")
        return quantize_gguf(rows, target, imatrix=imatrix)
    monkeypatch.setattr(qf, "quantize_gguf", failing)
    src, _ = model
    out = tmp_path / "out.gguf"
    with pytest.raises(MemoryError):
        quantize_file(str(src), str(out), "Q4_0", progress=False)
    assert len(calls) == 3 and not out.exists()


@pytest.mark.parametrize("edit, match", [
    ("heads-3", "embedding_length 256 is not a multiple of llama.attention.head_count 3"),
    ("no-output-norm", "output_norm.weight' is missing"),
    ("no-weight", "blk.5.ffn_gate.weight' is missing"),
    ("block-count", "block_count is 2147483648, but the file holds 8 blocks, blk.0 to blk.7"),
], ids=lambda x: x if " " not in x else "")
def test_gguf_the_loader_would_refuse_is_not_written(tmp_path, edit, match):
    tensors = model_tensors(np.random.default_rng(5))
    if edit == "no-output-norm":
        del tensors["output_norm.weight"]
    if edit == "no-weight":
        del tensors["blk.5.ffn_gate.weight"]
    src = tmp_path / "in.gguf"
    write_model(src, tensors, n_head=3 if edit == "heads-3" else N_HEAD,
                n_layer=2**31 if edit == "block-count" else N_LAYER)
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=match):
        quantize_file(str(src), str(out), "Q4_0", progress=False)
    assert not out.exists()


@pytest.mark.parametrize("case, match", [
    ("truncated", r"lies outside the file \(at byte \d+ of \d+\)"),
    ("counts", r"cannot fit .* \(at byte 16 of 24\)"),
    ("magic", "not a GGUF file"),
])
def test_malformed_input_is_a_gguf_error(model, tmp_path, case, match):
    # read by flashlm's reader, which names the byte offset (gguf-py's raised IndexError and the like)
    from flashlm.gguf import GGUFError

    src, _ = model
    bad = tmp_path / "bad.gguf"
    data = src.read_bytes()
    bad.write_bytes({"truncated": data[:len(data) // 2], "counts": b"GGUF\x03\x00\x00\x00" + b"\xff" * 16,
                     "magic": b"GGML" + data[4:]}[case])
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFError, match=match):
        quantize_file(str(bad), str(out), "Q4_0", progress=False)
    assert not out.exists()


def test_cli(model, tmp_path, capsys):
    src, tensors = model
    out = tmp_path / "cli.gguf"
    assert cli_main(["quantize", str(src), str(out), "--type", "q4_k_m"]) == 0
    assert f"{len(tensors)} tensors" in capsys.readouterr().out
    assert cli_main(["quantize", str(tmp_path / "missing.gguf"), str(out), "--type", "Q4_0"]) == 2
    assert "neither a GGUF file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["quantize", str(src), str(out), "--type", "Q7_K"])
