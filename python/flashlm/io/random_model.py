"""A random llama model as a GGUF file, for tests and benchmarks of loading and running GGUF models.

    write_random_llama_gguf("m.gguf", d_model=1024, d_ff=2816, n_layer=8, vocab_size=32000, ggml_type="Q4_0")

Weights are N(0, 0.02) quantized by flashlm's quantizers (ggml's reference bytes), norms are ones, and the
vocabulary is byte-level (the 256 byte symbols, one merge, then [PAD<i>] tokens up to vocab_size) so that
llama.cpp loads the file as well.
"""

from __future__ import annotations

import numpy as np
import torch


def write_random_llama_gguf(path: str, d_model: int, d_ff: int, n_layer: int, vocab_size: int, n_head: int = 8,
                            ggml_type: str = "Q4_0", tied: bool = False, context_length: int = 2048,
                            seed: int = 0) -> None:
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, TokenType
    from tokenizers import pre_tokenizers

    from flashlm.quant import quantize_gguf

    gen = torch.Generator().manual_seed(seed)
    w = GGUFWriter(path, "llama")
    for key, value in (("context_length", context_length), ("embedding_length", d_model), ("block_count", n_layer),
                       ("feed_forward_length", d_ff), ("attention.head_count", n_head),
                       ("attention.head_count_kv", n_head)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u0120t"]  # one merge: GGUF has no empty arrays
    if vocab_size < len(symbols):
        raise ValueError(f"vocab_size: at least {len(symbols)}, got {vocab_size}")
    tokens = symbols + [f"[PAD{i}]" for i in range(len(symbols), vocab_size)]
    types = [int(TokenType.NORMAL)] * len(symbols) + [int(TokenType.UNUSED)] * (vocab_size - len(symbols))
    for key, value, vtype, sub in (("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING, None),
                                   ("tokenizer.ggml.pre", "gpt-2", GGUFValueType.STRING, None),
                                   ("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
                                   ("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32),
                                   ("tokenizer.ggml.merges", ["\u0120 t"], GGUFValueType.ARRAY, GGUFValueType.STRING),
                                   ("tokenizer.ggml.eos_token_id", 0, GGUFValueType.UINT32, None)):
        w.add_key_value(key, value, vtype, sub_type=sub)

    def matrix(name, rows, cols):
        blocks = quantize_gguf(torch.randn(rows, cols, generator=gen) * 0.02, ggml_type)
        w.add_tensor(name, np.asarray(blocks), raw_dtype=GGMLQuantizationType[ggml_type])

    matrix("token_embd.weight", vocab_size, d_model)
    if not tied:
        matrix("output.weight", vocab_size, d_model)
    w.add_tensor("output_norm.weight", np.ones(d_model, np.float32))
    d = d_model
    for i in range(n_layer):
        for name, (rows, cols) in {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
                                   "ffn_gate": (d_ff, d), "ffn_up": (d_ff, d), "ffn_down": (d, d_ff)}.items():
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
