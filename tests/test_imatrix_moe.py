"""Importance matrices of mixture-of-experts models: one matrix per expert, as llama.cpp keeps them.

- collection against each expert's sums computed here from the blocks' MLP inputs, routed by softmax + top-k;
- quantization of a 3-D expert weight against llama.cpp's quantize_<type> given each expert's run of the
  imatrix values, bit for bit (tests/llama_cpp_ref.py; skipped where the sources are absent);
- the commands end to end on a random Mixtral: `flashlm imatrix`, then `flashlm quantize --imatrix`, every
  tensor byte-identical to llama.cpp's llama_model_quantize given the same imatrix.

The dense cases, the file formats and the helpers shared here are in test_imatrix.py.
"""

import numpy as np
import pytest
import torch

from flashlm.cli import main as cli_main
from flashlm.quant import GGUF_QUANT_TYPES
from flashlm.quant.imatrix import IMatrix, IMatrixEntry, collect_imatrix, read_imatrix
from test_gguf_quantize import make_rows, mismatch, rng_for
from test_imatrix import importance, llama_cpp_quantize, llama_ref, tensors_of  # noqa: F401 (fixture)


def test_collection_of_experts_per_expert():
    """MoE MLPs: one matrix per expert (llama.cpp's layout), each over the tokens routed to that expert:
    against the blocks' MLP inputs captured independently, routed by softmax + top-k written out here."""
    from flashlm.models import ModelConfig, Transformer
    from flashlm.quant.imatrix import gguf_expert_names

    cfg = ModelConfig(arch="mixtral", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48,
                      seq_len=64, n_expert=4, n_expert_used=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    assert gguf_expert_names(model) == {"blocks.0.mlp": "blk.0.", "blocks.1.mlp": "blk.1."}
    tokens = torch.randint(0, 50, (3 * 16,), generator=torch.Generator().manual_seed(2))
    seen = {}
    hooks = [model.blocks[i].mlp.register_forward_hook(
        lambda mod, inp, out, i=i: seen.setdefault(i, []).append(inp[0].detach().reshape(-1, 32))) for i in range(2)]
    try:
        m = collect_imatrix(model, tokens, chunk_size=16)
    finally:
        for h in hooks:
            h.remove()
    for i, mlp in enumerate(model.blocks[i].mlp for i in range(2)):
        x = torch.cat(seen[i]).double()
        top = torch.topk(torch.softmax(x @ mlp.router.weight.double().T, -1), 2, dim=-1).indices
        gate, up = mlp.experts_gate.detach().double(), mlp.experts_up.detach().double()
        counts, sums_in, sums_act = [], [], []
        for e in range(4):
            xe = x[(top == e).any(-1)]
            act = torch.nn.functional.silu(xe @ gate[e].T) * (xe @ up[e].T)
            counts.append(xe.shape[0])
            sums_in.append((xe * xe).sum(0))
            sums_act.append((act * act).sum(0))
        assert sum(counts) == 48 * 2 and min(counts) > 0
        for part, sums in (("gate", sums_in), ("up", sums_in), ("down", sums_act)):
            e = m.entries[f"blk.{i}.ffn_{part}_exps.weight"]
            assert e.counts.tolist() == counts, part
            ref = torch.cat(sums).numpy()
            assert e.sums.shape == ref.shape and np.allclose(e.sums, ref, rtol=1e-5, atol=0), part
            assert np.array_equal(m.importance(f"blk.{i}.ffn_{part}_exps.weight"),
                                  np.concatenate([e.sums[j * len(ref) // 4:(j + 1) * len(ref) // 4] / np.float32(c)
                                                  for j, c in enumerate(counts)]))
    assert m.entries["blk.0.attn_q.weight"].counts.tolist() == [48] and m.chunk_count == 3


@pytest.mark.parametrize("mix", ["Q4_K_M", "IQ4_XS"])
def test_moe_imatrix_quantizes_like_llama_cpp(tmp_path, mix):
    """A random Mixtral written as GGUF: `flashlm imatrix` collects its experts per expert, and `flashlm quantize
    --imatrix` gives every tensor, experts included, the bytes of llama.cpp's llama_model_quantize given it."""
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export import export_gguf
    from tokenizer_sources import train_bpe

    cfg = ModelConfig(arch="mixtral", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=256, d_ff=256,
                      seq_len=128, n_expert=4, n_expert_used=2, tie_embeddings=False)
    torch.manual_seed(6)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 1.0)
    export_gguf(model, cfg, train_bpe("gpt-2", vocab_size=300).to_str(), tmp_path / "m.gguf")
    words = "the of and to in is was for on that with as by at from it an are were which be this".split()
    (tmp_path / "calib.txt").write_text(" ".join(np.random.default_rng(4).choice(words, 200)))
    im = tmp_path / "im.gguf"
    assert cli_main(["imatrix", str(tmp_path / "m.gguf"), "--calib-data", str(tmp_path / "calib.txt"), "-o", str(im),
                     "--chunk-size", "64", "--quiet"]) == 0
    m = read_imatrix(im)
    assert m.entries["blk.1.ffn_down_exps.weight"].counts.shape == (4,)
    assert m.entries["blk.1.ffn_down_exps.weight"].sums.shape == (4 * 256,)
    ours = tmp_path / "ours.gguf"
    assert cli_main(["quantize", str(tmp_path / "m.gguf"), str(ours), "--type", mix, "--imatrix", str(im),
                     "--quiet"]) == 0
    llama_cpp_quantize(tmp_path / "m.gguf", tmp_path / "ref.gguf", mix, m)
    got, ref = tensors_of(ours), tensors_of(tmp_path / "ref.gguf")
    assert sorted(got) == sorted(ref)
    assert any("_exps" in n and got[n][0] != "F32" for n in got)
    differ = [(n, got[n][0], ref[n][0]) for n in ref if got[n] != ref[n]]
    assert not differ, f"tensors that differ from llama.cpp's (name, ours, llama.cpp's): {differ}"


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_XS", "Q3_K", "Q4_0"])
def test_experts_quantize_like_llama_cpp(llama_ref, name):
    """A 3-D (expert) weight: llama.cpp's quantize tool hands ggml's quantizer each expert's rows with that
    expert's run of the imatrix values (imatrix + expert * n_per_row); an expert that saw no tokens gets ones."""
    from flashlm.quant.imatrix import quantize_experts

    rng = rng_for("imatrix-experts", name)
    n_expert, rows, n = 3, 4, 512
    x = make_rows("mixed_scales", n_expert * rows, n, GGUF_QUANT_TYPES[name][0], rng)
    m = IMatrix({"blk.0.ffn_up_exps.weight": IMatrixEntry(
        np.concatenate([importance("skewed", n, rng) * 40, np.zeros(n, np.float32), importance("zeros", n, rng) * 9]),
        np.array([40, 0, 9], np.int64))})
    values = m.importance("blk.0.ffn_up_exps.weight")
    ours = quantize_experts(x, name, values, n_expert)
    ref = np.concatenate([llama_ref.quantize_imatrix(x[e * rows:(e + 1) * rows], name, values[e * n:(e + 1) * n])
                          for e in range(n_expert)])
    assert not mismatch(ours, ref), mismatch(ours, ref)
    # each expert's own values matter: the same rows under one shared run quantize differently
    assert not np.array_equal(ours, quantize_experts(x, name, np.tile(values[:n], n_expert), n_expert))


def test_experts_quantize_refuses():
    from flashlm.quant.imatrix import quantize_experts

    x = np.ones((6, 256), np.float32)
    with pytest.raises(ValueError, match="n_expert"):
        quantize_experts(x, "Q4_K", np.ones(4 * 256, np.float32), 4)
    with pytest.raises(ValueError, match="imatrix"):
        quantize_experts(x, "Q4_K", np.ones(2 * 256, np.float32), 3)
