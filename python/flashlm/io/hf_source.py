"""An HF safetensors model directory as a source of GGUF tensors (llama-style and GPT-2 checkpoints).

Reads config.json and the *.safetensors files (memory-mapped, no extra dependency) of LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM
and GPT2LMHeadModel models, and the mixtures of experts MixtralForCausalLM (llama.cpp's llama with experts),
Qwen2MoeForCausalLM and Qwen3MoeForCausalLM, renames the tensors as llama.cpp's convert_hf_to_gguf.py does
(`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, `h.3.attn.c_attn.weight` ->
`blk.3.attn_qkv.weight`; Phi-3's fused qkv_proj and gate_up_proj -> `attn_qkv` and `ffn_up`, kept fused),
permutes the q/k projections of llama models into the row order of ggml's rope, adds one to Gemma's norm
weights (llama.cpp stores its (1 + w)), transposes GPT-2's Conv1D weights to [out, in], stacks each layer's
per-expert matrices into llama.cpp's ffn_gate_exps / ffn_up_exps / ffn_down_exps [experts, rows, cols], and gives the
architecture's hyperparameters as GGUF metadata (Llama 3's rope scaling as the rope_freqs tensor). A byte-level BPE
tokenizer.json beside the weights becomes the GGUF's tokenizer (flashlm.io.gguf_tokenizer); a tokenizer
of another kind is left out with a warning.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings

import numpy as np
from gguf import GGUFValueType

from flashlm.io.gguf_layout import (check_llama_cpp_gemma, check_llama_cpp_head_dim, check_llama_cpp_moe, gguf_arch,
                                    longrope_tensors, moe_metadata, window_metadata)
from flashlm.io.gguf_tokenizer import tokenizer_metadata
from flashlm.io.hf_config import model_config_from_hf, read_json
from flashlm.models.config import LIMITS
from flashlm.models.shapes import check_block_count

# HF architecture -> GGUF architecture, and whether q/k rows are permuted (llama's rope layout)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False),
                 "Gemma2ForCausalLM": ("gemma2", False), "Gemma3ForCausalLM": ("gemma3", False),
                 "Phi3ForCausalLM": ("phi3", False), "GPT2LMHeadModel": ("gpt2", False),
                 "MixtralForCausalLM": ("llama", True), "Qwen2MoeForCausalLM": ("qwen2moe", False),
                 "Qwen3MoeForCausalLM": ("qwen3moe", False)}

_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_PER_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GEMMA_PER_LAYER = _PER_LAYER | {"post_attention_layernorm": "post_attention_norm",
                                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
# Phi-3's fused q|k|v and gate|up keep their fusion: llama.cpp's phi3 reads attn_qkv and a [2 d_ff] ffn_up
_PHI3_PER_LAYER = _PER_LAYER | {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
# Mixture of experts: the router, qwen2moe's shared expert and its gate; the experts are stacked (_EXPERT_RE)
_MOE_PER_LAYER = {k: v for k, v in _PER_LAYER.items() if not k.startswith("mlp.")} | {
    "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_GGUF = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
                "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# GPT-2 (names with or without the "transformer." prefix); its Conv1D weights are stored [in, out]
_GPT2_TOP_LEVEL = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
_GPT2_PER_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                   "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_GPT2_LAYER_RE = re.compile(r"h\.(\d+)\.(.+)\.(weight|bias)$")
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
_ST_DTYPES = {"F32": ("F32", np.float32), "F16": ("F16", np.float16), "BF16": ("BF16", np.uint16)}


def gpt2_gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a GPT-2 tensor, or None for the attention-mask buffers llama.cpp does not load."""
    name = hf_name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    if name == "lm_head.weight":
        return "output.weight"
    stem, _, kind = name.rpartition(".")
    if stem in _GPT2_TOP_LEVEL and kind in ("weight", "bias"):
        return f"{_GPT2_TOP_LEVEL[stem]}.{kind}"
    m = _GPT2_LAYER_RE.match(name)
    if m and m.group(2) in _GPT2_PER_LAYER:
        return f"blk.{m.group(1)}.{_GPT2_PER_LAYER[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"{hf_name}: no GGUF name for this GPT-2 tensor")


def gguf_name(hf_name: str, per_layer: dict = _PER_LAYER) -> str | None:
    """The GGUF name of a llama-style HF tensor, or None for tensors llama.cpp does not load (inv_freq)."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in per_layer:
        return f"blk.{m.group(1)}.{per_layer[m.group(2)]}.{m.group(3)}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"{hf_name}: no GGUF name for this tensor (supported: {', '.join(ARCHITECTURES)})")


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8 or n > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes does not fit the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the safetensors header is not a JSON object")
        return header, 8 + n


def _entry(meta, where: str, data_bytes: int) -> tuple:
    """(type name, numpy dtype, shape, data offset) of a safetensors header entry, checked against the file's
    data_bytes bytes of tensor data."""
    try:
        dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, begin, end])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: malformed safetensors entry {str(meta)[:200]}")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"{where} has dtype {dtype} (F32, F16 and BF16 are supported)")
    type_name, np_dtype = _ST_DTYPES[dtype]
    shape = tuple(shape)
    if not begin <= end <= data_bytes:
        raise ValueError(f"{where}: data [{begin}, {end}) lies outside the file's {data_bytes} bytes of data")
    if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
        raise ValueError(f"{where}: data size does not match its shape {shape}")
    return type_name, np_dtype, shape, begin


def llama3_rope_factors(head_dim: int, rope_theta: float, rope_scaling: dict) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for Llama 3's rope scaling (convert_hf_to_gguf's LlamaModel): ggml
    divides frequency i, theta^(-2i/hd), by factor i, which gives the scaled frequency of HF's "llama3"
    rope: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between."""
    old = rope_scaling.get("original_max_position_embeddings", 8192)
    low, high = rope_scaling.get("low_freq_factor", 1.0), rope_scaling.get("high_freq_factor", 4.0)
    factor = rope_scaling.get("factor", 8.0)
    wavelen = 2 * np.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half row order -> ggml's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class HFSource:
    def __init__(self, path: str):
        self.config = read_json(os.path.join(path, "config.json"), required=True)
        # The HF loader's checks of config.json (the context is the loader's max_model_len: any will do here).
        self.model_config = mc = model_config_from_hf(self.config, max_model_len=1)
        # llama's (and Mixtral's) q/k rows go to ggml's rope order
        self.arch, self._permute = gguf_arch(mc), mc.base_arch == "llama"
        if self.arch not in ("llama", "gemma3", "phi3") and mc.rope_scaling is not None:  # gemma3's is metadata
            raise ValueError(f"config.json: rope scaling on {self.arch} has no GGUF form that llama.cpp reads")
        self.n_head, self.n_head_kv = mc.n_head, mc.n_kv_head
        check_llama_cpp_head_dim(mc)
        check_llama_cpp_moe(mc)
        to_gguf = gpt2_gguf_name if self.arch == "gpt2" else gguf_name
        if mc.moe:
            to_gguf = lambda name: gguf_name(name, _MOE_PER_LAYER)  # noqa: E731
        if self.arch == "phi3":
            to_gguf = lambda name: gguf_name(name, _PHI3_PER_LAYER)  # noqa: E731
        if mc.gemma:
            check_llama_cpp_gemma(mc)  # what llama.cpp's gemma2 cannot compute is refused before writing
            to_gguf = lambda name: None if name == "lm_head.weight" else gguf_name(name, _GEMMA_PER_LAYER)  # noqa: E731
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors files")
        self._entries = {}  # gguf name -> (file, data offset, numpy dtype, stored shape, transposed)
        self._experts = {}  # ffn_*_exps name -> {expert: its _entries value}, stacked by load()
        self.tensors = []  # (gguf name, shape in torch order, type name); no output.weight: tied embeddings
        hf_names = []
        for fname in files:
            full = os.path.join(path, fname)
            header, base = _read_safetensors_header(full)
            # in sorted name order within each file, as convert_hf_to_gguf.py writes them (the mix's
            # attn_v/ffn_down counters follow the file order)
            for hf_name, meta in sorted(header.items()):
                if hf_name == "__metadata__":
                    continue
                hf_names.append(hf_name)
                expert = _EXPERT_RE.match(hf_name) if mc.moe else None
                if expert:
                    self._add_expert(expert, meta, full, base)
                    continue
                name = to_gguf(hf_name)
                if name is None:
                    continue
                if name in self._entries:
                    raise ValueError(f"{full}: {hf_name}: a second tensor named {name}")
                type_name, np_dtype, shape, begin = _entry(meta, f"{full}: {hf_name}", os.path.getsize(full) - base)
                transpose = self.arch == "gpt2" and hf_name.endswith(_GPT2_CONV1D) and len(shape) == 2
                self._entries[name] = (full, base + begin, np_dtype, shape, transpose)
                if mc.gemma and name.endswith("norm.weight"):
                    type_name = "F32"  # written as 1 + w, computed in float32
                if name.endswith("ffn_gate_inp_shexp.weight"):
                    shape = shape[1:] if len(shape) == 2 and shape[0] == 1 else shape  # llama.cpp's is a [d] vector
                self.tensors.append((name, shape[::-1] if transpose else shape, type_name))
        self._stack_experts()
        if self.arch == "gpt2":
            names = [n.removeprefix("transformer.") for n in hf_names]
            check_block_count(mc.n_layer, names, "h.", "config.json: n_layer")
        else:
            check_block_count(mc.n_layer, hf_names, "model.layers.", "config.json: num_hidden_layers")
        self._extra = self._rope_freqs()  # tensors computed from the config, not read from a file
        self.tensors = [(n, a.shape, "F32") for n, a in self._extra.items()] + self.tensors
        self.metadata = self._hparams(os.path.basename(os.path.normpath(path))) + self._tokenizer(path)

    def _add_expert(self, match, meta, path: str, base: int) -> None:
        """Records one expert's matrix under its layer's ffn_*_exps name (listed once, at its first expert)."""
        layer, expert, kind = int(match.group(1)), int(match.group(2)), match.group(3)
        name = f"blk.{layer}.{_EXPERT_GGUF[kind]}.weight"
        where = f"{path}: {match.group(0)}"
        if expert >= self.model_config.n_expert:
            raise ValueError(f"{where}: expert {expert} beyond the {self.model_config.n_expert} of config.json")
        type_name, np_dtype, shape, begin = _entry(meta, where, os.path.getsize(path) - base)
        parts = self._experts.setdefault(name, {})
        if not parts:
            self.tensors.append((name, None, type_name))
        if expert in parts:
            raise ValueError(f"{where}: a second tensor for expert {expert} of {name}")
        parts[expert] = (path, base + begin, np_dtype, shape, False)

    def _stack_experts(self) -> None:
        """Gives each ffn_*_exps tensor its shape [experts, rows, cols], every expert present, alike in shape
        and dtype."""
        E = self.model_config.n_expert
        for i, (name, shape, type_name) in enumerate(self.tensors):
            if shape is not None:
                continue
            parts = self._experts[name]
            missing = [e for e in range(E) if e not in parts]
            if missing:
                raise ValueError(f"weights: expert {missing[0]} of {name} is missing (config.json has {E} experts)")
            first = parts[0]
            for e, part in parts.items():
                if part[2] != first[2] or part[3] != first[3]:
                    raise ValueError(f"weights: expert {e} of {name} has shape {part[3]} ({part[2].__name__}), "
                                     f"expert 0 {first[3]} ({first[2].__name__})")
            if len(first[3]) != 2:
                raise ValueError(f"weights: the experts of {name} have shape {first[3]}, expected 2-D")
            self.tensors[i] = (name, (E, *first[3]), type_name)

    def _tokenizer(self, path: str) -> list:
        """tokenizer.json as GGUF metadata, or nothing when there is none or llama.cpp cannot use it."""
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            return []
        rows = [s[0] for n, s, _ in self.tensors if n == "token_embd.weight"]
        eos = self.config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        with open(tok_path, encoding="utf-8") as f:
            text = f.read()
        try:
            return tokenizer_metadata(text, vocab_size=rows[0] if rows else None,
                                      eos_token_id=eos if isinstance(eos, int) else None)
        except ValueError as e:
            warnings.warn(f"{tok_path}: not written to the GGUF file: {e}", stacklevel=3)
            return []

    def _hparams(self, name: str) -> list:
        """convert_hf_to_gguf's set_gguf_parameters, from the checked config (the context as declared)."""
        cfg, mc, a = self.config, self.model_config, self.arch
        u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
        context = cfg["n_positions"] if a == "gpt2" else cfg["max_position_embeddings"]
        meta = [("general.name", name, GGUFValueType.STRING, None), (f"{a}.block_count", mc.n_layer, u32, None),
                (f"{a}.context_length", context, u32, None), (f"{a}.embedding_length", mc.d_model, u32, None),
                (f"{a}.feed_forward_length", mc.d_ff, u32, None), (f"{a}.attention.head_count", mc.n_head, u32, None)]
        if a == "gpt2":
            return meta + [("gpt2.attention.layer_norm_epsilon", mc.norm_eps, f32, None)]
        meta += [(f"{a}.attention.head_count_kv", mc.n_kv_head, u32, None),
                 (f"{a}.rope.freq_base", mc.rope_theta, f32, None),
                 (f"{a}.attention.layer_norm_rms_epsilon", mc.norm_eps, f32, None)]
        if "vocab_size" in cfg:
            meta.append((f"{a}.vocab_size", mc.vocab_size, u32, None))
        if a in ("llama", "phi3"):
            meta.append((f"{a}.rope.dimension_count", mc.head_dim, u32, None))
        if a in ("qwen3", "qwen3moe", "gemma2", "gemma3") or mc.head_dim * mc.n_head != mc.d_model:  # its own head_dim
            meta += [(f"{a}.attention.key_length", mc.head_dim, u32, None),
                     (f"{a}.attention.value_length", mc.head_dim, u32, None)]
        if a == "llama":  # Mistral's window, read at the declared context (mc's is 1, which no window is under)
            mc = model_config_from_hf(cfg, max_model_len=min(context, LIMITS["seq_len"]))
        meta += [(k, v, t, None) for k, v, t in moe_metadata(mc)]
        return meta + [(k, v, t, None) for k, v, t in window_metadata(mc, context)]

    def _rope_freqs(self) -> dict:
        """{"rope_freqs.weight": factors} for a llama with Llama 3's rope scaling, phi3's LongRoPE factors, else
        nothing."""
        mc = self.model_config
        if mc.rope_scaling is None or mc.rope_scaling["rope_type"] != "llama3":
            return longrope_tensors(mc)
        return {"rope_freqs.weight": llama3_rope_factors(mc.head_dim, mc.rope_theta, mc.rope_scaling)}

    def load(self, index: int):
        """Tensor `index` as a numpy array in torch order (BF16 as its raw uint16 bits)."""
        name = self.tensors[index][0]
        if name in self._extra:
            return self._extra[name]
        if name in self._experts:
            parts = self._experts[name]
            return np.stack([np.memmap(p, dtype=dt, mode="r", offset=off, shape=shape)
                             for p, off, dt, shape, _ in (parts[e] for e in range(len(parts)))])
        path, offset, np_dtype, shape, transpose = self._entries[name]
        data = np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=shape)
        if self._permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = permute_rope_rows(np.asarray(data), self.n_head if "attn_q" in name else self.n_head_kv)
        if transpose:
            data = np.ascontiguousarray(np.asarray(data).T)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            data = np.asarray(data).reshape(-1)
        if self.model_config.gemma and name.endswith("norm.weight"):  # Gemma's (1 + w), as llama.cpp reads it
            data = np.asarray(data)
            if np_dtype == np.uint16:  # BF16 bits
                data = (data.astype(np.uint32) << 16).view(np.float32)
            data = 1.0 + data.astype(np.float32)
        return data
