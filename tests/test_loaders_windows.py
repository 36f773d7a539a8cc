"""Sliding windows and phi3's fused tensors as flashlm.io's loaders read them from HF directories and GGUF
files: a window kept where the architecture has one on every layer (Mistral, phi3), left out when it spans the
context, refused where flashlm has no such attention; bad values and malformed files name the key or tensor.
The models are test_loaders' (make_hf); their logits against transformers and llama.cpp are tested there."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_to_gguf import write_gguf  # noqa: E402
from test_loaders import _set_uint32, make_hf  # noqa: E402

from flashlm.io import load_gguf, load_hf  # noqa: E402


def test_hf_mistral_sliding_window(tmp_path):
    hf, _ = make_hf("mistral")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf(tmp_path)  # a window on every layer, shorter than the context 128: kept
    assert loaded.config.sliding_window == 64 and loaded.config.kv_window == 64
    assert all(block.attn.window == 64 for block in loaded.model.blocks)
    short = load_hf(tmp_path, max_model_len=64).config  # the window spans the whole context: no window
    assert short.seq_len == 64 and short.sliding_window is None
    for bad in (0, -3, 2.5, "64", True):
        cfg["sliding_window"] = bad
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="sliding_window"):
            load_hf(tmp_path)
    cfg.update(sliding_window=64, architectures=["LlamaForCausalLM"])  # transformers' Llama has no window
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf(tmp_path).config.sliding_window is None


def test_gguf_llama_sliding_window(tmp_path):
    """llama.attention.sliding_window: a window shorter than the context is kept (Mistral's, every layer), one
    as long is no window, a bad value names the key."""
    hf, arch = make_hf("mistral")
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, "F32")
    from flashlm.io.gguf import GGUFFile
    from flashlm.io.gguf_layout import gguf_model_config
    with GGUFFile(path) as f:
        metadata, shapes = dict(f.metadata), {t.name: t.shape for t in f.tensors}
    key = "llama.attention.sliding_window"
    assert gguf_model_config(metadata, shapes).sliding_window is None
    cfg = gguf_model_config({**metadata, key: 16}, shapes)
    assert cfg.sliding_window == cfg.kv_window == 16 and cfg.layer_window(1) == 16
    assert gguf_model_config({**metadata, key: 16}, shapes, max_model_len=16).sliding_window is None
    for bad in (0, -1, 2.5, "16", 1 << 40):
        with pytest.raises(ValueError, match=key):
            gguf_model_config({**metadata, key: bad}, shapes)
    hf, arch = make_hf("qwen2")
    write_gguf(hf, arch, str(tmp_path / "q.gguf"), "F32")
    with GGUFFile(str(tmp_path / "q.gguf")) as f:
        metadata, shapes = dict(f.metadata), {t.name: t.shape for t in f.tensors}
    with pytest.raises(ValueError, match="qwen2.attention.sliding_window 16 is shorter"):  # no window for qwen2
        gguf_model_config({**metadata, "qwen2.attention.sliding_window": 16}, shapes)


def test_hf_qwen2_sliding_window_only_when_used(tmp_path):
    hf, _ = make_hf("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(sliding_window=32, use_sliding_window=False, layer_types=["full_attention"] * 2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf(tmp_path).config.seq_len == 128
    cfg.update(layer_types=["full_attention", "sliding_attention"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding_window 32"):
        load_hf(tmp_path)


@pytest.mark.parametrize("case, match", [
    ("qkv", "blk.0.attn_qkv.weight"),
    ("gate_up", "blk.1.ffn_up.weight"),
    ("long_rope", "rope_factors_long.weight"),
    ("long_rope_shape", "rope_factors_short.weight"),
    ("long_rope_zero", "long_factor"),
    ("rope_dims", "partial rotary"),
    ("window", "sliding_window"),
])
def test_gguf_phi3_malformed_raises_naming_it(tmp_path, case, match):
    hf, arch = make_hf("phi3")
    path = str(tmp_path / "m.gguf")
    if case == "qkv":  # q|k|v as if MHA: the K/V heads the metadata declares do not fit
        write_gguf(hf, arch, path, "F32", replace={"blk.0.attn_qkv.weight": np.zeros((192, 64), np.float32)})
    elif case == "gate_up":  # gate without up
        write_gguf(hf, arch, path, "Q8_0", replace={"blk.1.ffn_up.weight": np.zeros((96, 64), np.float32)})
    elif case == "long_rope":  # LongRoPE's long factors without the short ones
        write_gguf(hf, arch, path, "F32", extra={"rope_factors_long.weight": np.ones(8, np.float32)})
    elif case == "long_rope_shape":  # 7 short factors for 8 rotary frequencies
        write_gguf(hf, arch, path, "F32", extra={"rope_factors_long.weight": np.ones(8, np.float32),
                                                 "rope_factors_short.weight": np.ones(7, np.float32)})
    elif case == "long_rope_zero":  # a factor of 0 would divide a frequency by zero
        write_gguf(hf, arch, path, "F32", extra={"rope_factors_long.weight": np.zeros(8, np.float32),
                                                 "rope_factors_short.weight": np.ones(8, np.float32)})
    else:
        write_gguf(hf, arch, path, "F32")
        key = {"rope_dims": "phi3.rope.dimension_count", "window": "phi3.attention.sliding_window"}[case]
        _set_uint32(path, key, 12 if case == "rope_dims" else 2**31)
    with pytest.raises(ValueError, match=match):
        load_gguf(path)
