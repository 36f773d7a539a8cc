"""flashlm.models.Transformer against an independent float64 reference written from the state dict (explicit
masked softmax attention, rotary embeddings through complex numbers), for both families, GQA, one token and a
full window; gradient checkpointing, bf16 autocast, torch's SDPA as a second attention, and bad configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.simple_generate import generate


def reference_logits(cfg: ModelConfig, sd: dict, idx: torch.Tensor) -> torch.Tensor:
    """float64 logits from the parameters alone."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    gemma = cfg.arch in ("gemma2", "gemma3")
    # the local layers: gemma2's even ones, gemma3's all but every sixth, all of a llama with a window (Mistral)
    local = [(cfg.arch == "gemma2" and i % 2 == 0) or (cfg.arch == "gemma3" and i % 6 != 5)
             or (cfg.arch == "llama" and cfg.sliding_window is not None) for i in range(cfg.n_layer)]
    x = sd["tok_emb.weight"][idx]
    if gemma:
        x = x * math.sqrt(cfg.d_model)
    if cfg.arch == "gpt2":
        x = x + sd["pos_emb.weight"][:T]

    def norm(h, prefix):
        if cfg.arch == "gpt2":
            return F.layer_norm(h, (cfg.d_model,), sd[prefix + ".weight"], sd[prefix + ".bias"], cfg.norm_eps)
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".weight"]

    def linear(h, prefix):
        return F.linear(h, sd[prefix + ".weight"], sd.get(prefix + ".bias"))

    def rope(t, theta):  # t [B, T, heads, hd]; element i pairs with i + hd/2 (HF's rotate-half layout)
        half = hd // 2
        freq = torch.tensor([llama3_scaled(theta ** (-2 * i / hd), cfg.rope_scaling) for i in range(half)],
                            dtype=torch.float64)
        phase = torch.polar(torch.ones(T, half, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * freq)
        z = torch.complex(t[..., :half], t[..., half:]) * phase[None, :, None, :]
        return torch.cat((z.real, z.imag), dim=-1)

    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        h = norm(x, p + ".attn_norm")
        q = linear(h, p + ".attn.q").view(B, T, H, hd)
        k = linear(h, p + ".attn.k").view(B, T, KV, hd)
        v = linear(h, p + ".attn.v").view(B, T, KV, hd)
        if cfg.arch in ("qwen3", "gemma3"):  # each head of q and k RMS-normed over its hd values
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[p + ".attn.q_norm.weight"]
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[p + ".attn.k_norm.weight"]
        if cfg.arch != "gpt2":
            theta = cfg.rope_local_theta if local[i] and cfg.rope_local_theta else cfg.rope_theta
            q, k = rope(q, theta), rope(k, theta)
        k = k.repeat_interleave(H // KV, dim=2)
        v = v.repeat_interleave(H // KV, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.query_pre_attn_scalar or hd)
        keep = mask
        if cfg.attn_softcap:
            s = cfg.attn_softcap * torch.tanh(s / cfg.attn_softcap)
        if local[i] and cfg.sliding_window:  # the last sliding_window keys only
            keep = mask & ~torch.ones(T, T, dtype=torch.bool).tril(-cfg.sliding_window)
        a = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, T, H * hd)
        y = linear(y, p + ".attn.o")
        x = x + (norm(y, p + ".post_attn_norm") if gemma else y)
        h = norm(x, p + ".mlp_norm")
        if cfg.arch == "gpt2":
            h = linear(F.gelu(linear(h, p + ".mlp.fc"), approximate="tanh"), p + ".mlp.proj")
        elif gemma:
            h = linear(F.gelu(linear(h, p + ".mlp.gate"), approximate="tanh") * linear(h, p + ".mlp.up"), p + ".mlp.down")
            h = norm(h, p + ".post_mlp_norm")
        else:
            h = linear(F.silu(linear(h, p + ".mlp.gate")) * linear(h, p + ".mlp.up"), p + ".mlp.down")
        x = x + h
    x = norm(x, "final_norm")
    logits = F.linear(x, sd["lm_head.weight"] if "lm_head.weight" in sd else sd["tok_emb.weight"])
    return cfg.final_softcap * torch.tanh(logits / cfg.final_softcap) if cfg.final_softcap else logits


def llama3_scaled(freq, rs):
    """One rotary frequency under Llama 3's rule (as Meta's reference code states it, branch by branch)."""
    if rs is None:
        return freq
    wavelen = 2 * math.pi / freq
    low_wavelen = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wavelen = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    if wavelen < high_wavelen:
        return freq
    if wavelen > low_wavelen:
        return freq / rs["factor"]
    smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
        rs["high_freq_factor"] - rs["low_freq_factor"])
    return (1 - smooth) * freq / rs["factor"] + smooth * freq


LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)

CONFIGS = [
    dict(arch="gpt2", vocab_size=97, n_layer=2, n_head=4, d_model=64, seq_len=40),
    dict(arch="llama", vocab_size=101, n_layer=2, n_head=4, n_kv_head=4, d_model=64, seq_len=40),
    dict(arch="llama", vocab_size=61, n_layer=3, n_head=6, n_kv_head=2, d_model=96, seq_len=40, tie_embeddings=False),
    dict(arch="llama", vocab_size=50, n_layer=1, n_head=4, n_kv_head=1, d_model=80, seq_len=33, rope_theta=500000.0),
    dict(arch="qwen2", vocab_size=70, n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=40, rope_theta=1e6),
    # Mistral: a window of 7 on every layer, shorter than most sequences here
    dict(arch="llama", vocab_size=59, n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=40, sliding_window=7),
    # original_max 64 with head_dim 32: the frequencies span all three of Llama 3's regimes.
    dict(arch="llama", vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=64, seq_len=40,
         rope_scaling=LLAMA3_SCALING),
    # q is n_head * head_dim = 80 wide, the model 64; untied
    dict(arch="qwen3", vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=20, seq_len=40,
         tie_embeddings=False),
    # a window of 6 on layers 0 and 2, shorter than most sequences here; caps that bite (scores reach ~3)
    dict(arch="gemma2", vocab_size=71, n_layer=3, n_head=4, n_kv_head=2, d_model=64, head_dim=24, seq_len=40,
         sliding_window=6, attn_softcap=2.0, final_softcap=3.0, query_pre_attn_scalar=20),
    # layers 0-4 and 6 local (window 5, rope base 100), layer 5 global (base 1e4); no soft-caps
    dict(arch="gemma3", vocab_size=73, n_layer=7, n_head=2, n_kv_head=1, d_model=32, head_dim=16, seq_len=40,
         sliding_window=5, rope_local_theta=100.0, query_pre_attn_scalar=16),
]


def _randomize(model, seed):
    # Norm weights and biases start at 1 and 0: make them random so the reference checks their use too.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("cfg_kw", CONFIGS, ids=lambda c: f"{c['arch']}-kv{c.get('n_kv_head', c['n_head'])}-d{c['d_model']}"
                         + ("-llama3" if c.get("rope_scaling") else ""))
@pytest.mark.parametrize("T", [1, 17, None])
def test_logits_match_float64_reference(cfg_kw, T):
    cfg = ModelConfig(**cfg_kw)
    T = cfg.seq_len if T is None else T
    torch.manual_seed(hash((cfg.arch, cfg.d_model, T)) % 1000)
    model = Transformer(cfg).eval()
    _randomize(model, T)
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, T, cfg.vocab_size)
    ref = reference_logits(cfg, model.state_dict(), idx)
    err = (logits.double() - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"max abs error {err}"


@pytest.mark.parametrize("cfg_kw", CONFIGS[:3] + CONFIGS[-3:],
                         ids=["gpt2", "llama", "llama-gqa", "qwen3", "gemma2", "gemma3"])
def test_gradients_match_sdpa(cfg_kw):
    cfg = ModelConfig(**cfg_kw)
    torch.manual_seed(1)
    ours = Transformer(cfg)
    base = Transformer(cfg, attn_impl="sdpa")
    base.load_state_dict(ours.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len - 5))
    targets = torch.randint(0, cfg.vocab_size, idx.shape)
    targets[0, :4] = -100  # ignored positions
    _, loss_a = ours(idx, targets)
    _, loss_b = base(idx, targets)
    loss_a.backward()
    loss_b.backward()
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    for (name, a), b in zip(ours.named_parameters(), base.parameters()):
        scale = b.grad.abs().max().item()
        err = (a.grad - b.grad).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max grad error {err} (scale {scale})"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3", "gemma2"])
def test_gradient_checkpointing_changes_nothing(arch):
    cfg = ModelConfig(arch=arch, vocab_size=64, n_layer=3, n_head=2, d_model=32, seq_len=24)
    torch.manual_seed(2)
    plain = Transformer(cfg)
    ckpt = Transformer(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.checkpointing = True
    idx = torch.randint(0, 64, (2, 24))
    for m in (plain, ckpt):
        m(idx, idx)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), f"{name}: recomputation changed the gradient"


def test_bf16_autocast_close_to_float32():
    cfg = ModelConfig(arch="llama", vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=32)
    torch.manual_seed(3)
    model = Transformer(cfg)
    idx = torch.randint(0, 128, (2, 32))
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16 = model(idx, idx)
    assert logits16.dtype == torch.bfloat16
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: a loss near ln(128) = 4.85 moves by well under 1%.
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item()


def test_generate_greedy_is_argmax_of_forward():
    cfg = ModelConfig(arch="llama", vocab_size=50, n_layer=2, n_head=2, d_model=32, seq_len=12)
    torch.manual_seed(4)
    model = Transformer(cfg).eval()
    _randomize(model, 4)
    idx = torch.randint(0, 50, (2, 5))
    out = generate(model, idx, 10, temperature=0)  # runs past seq_len: the window slides
    assert out.shape == (2, 15) and torch.equal(out[:, :5], idx)
    for t in range(5, 15):
        window = out[:, max(0, t - cfg.seq_len):t]
        assert torch.equal(model(window)[0][:, -1].argmax(-1), out[:, t])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(generate(model, idx, 6, top_k=5, generator=g1), generate(model, idx, 6, top_k=5, generator=g2))


def test_param_groups_and_flops():
    cfg = ModelConfig(arch="gpt2", vocab_size=100, n_layer=2, n_head=2, d_model=16, seq_len=8)
    model = Transformer(cfg)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"] + no_decay["params"]) == sorted(names.values())
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() == 2 for p in decay["params"])
    # Per block: q, k, v, o (d*d + d each), fc and proj (d*4d + 4d, 4d*d + d), two LayerNorms (2d each).
    d = 16
    per_block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    non_embedding = 2 * per_block + 2 * d
    assert model.num_params(non_embedding=True) == non_embedding
    assert model.num_params() == non_embedding + 100 * d + 8 * d
    assert model.flops_per_token() == 6 * (non_embedding + 100 * d) + 12 * 2 * d * 8


@pytest.mark.parametrize("kw, name", [
    (dict(arch="bert"), "arch"), (dict(n_head=3, d_model=64), "d_model"), (dict(n_kv_head=3), "n_kv_head"),
    (dict(arch="gpt2", n_kv_head=2), "n_kv_head"), (dict(vocab_size=0), "vocab_size"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(arch="llama", rope_scaling={"rope_type": "yarn"}), "rope_scaling"),
    (dict(arch="llama", rope_scaling=dict(LLAMA3_SCALING, factor=0.5)), "rope_scaling"),
    (dict(arch="gpt2", rope_scaling=LLAMA3_SCALING), "rope_scaling"),
    # sizes past any model's: a file's count must not build billions of modules or table rows
    (dict(n_layer=4097), "n_layer"), (dict(n_layer=2**31), "n_layer"), (dict(n_head=2048, d_model=4096), "n_head"),
    (dict(d_model=2**18, n_head=256), "d_model"), (dict(d_ff=2**21), "d_ff"), (dict(vocab_size=2**25), "vocab_size"),
    (dict(seq_len=2**25), "seq_len"), (dict(d_model=2048, n_head=1), "head_dim"), (dict(n_layer=True), "n_layer"),
    (dict(norm_eps=float("inf")), "norm_eps"), (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(n_kv_head=2.0), "n_kv_head"),
    (dict(arch="gpt2", head_dim=32), "head_dim"), (dict(arch="qwen3", head_dim=0), "head_dim"),
    (dict(arch="qwen3", head_dim=2048), "head_dim"), (dict(arch="qwen3", head_dim=15), "head_dim"),
    (dict(arch="qwen3", head_dim=16.0), "head_dim"),
    (dict(arch="qwen2", sliding_window=8), "sliding_window"), (dict(arch="gemma2", sliding_window=0), "sliding_window"),
    (dict(arch="gpt2", sliding_window=8), "sliding_window"), (dict(arch="llama", sliding_window=0), "sliding_window"),
    (dict(arch="llama", sliding_window=8.0), "sliding_window"), (dict(arch="llama", sliding_window=True), "sliding_window"),
    (dict(arch="gemma2", attn_softcap=0.0), "attn_softcap"), (dict(arch="gemma2", final_softcap=float("inf")), "final_softcap"),
    (dict(arch="gemma2", query_pre_attn_scalar=-1), "query_pre_attn_scalar"), (dict(arch="gpt2", attn_softcap=5.0), "attn_softcap"),
    (dict(arch="gemma2", rope_local_theta=10.0), "rope_local_theta"), (dict(arch="gemma3", rope_local_theta=0.0), "rope_local_theta"),
])
def test_bad_config_names_the_field(kw, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**kw)


def test_config_sizes_at_their_limits_are_accepted():
    from flashlm.models.config import LIMITS

    cfg = ModelConfig(arch="llama", n_layer=LIMITS["n_layer"], n_head=LIMITS["n_head"], d_model=LIMITS["d_model"],
                      d_ff=LIMITS["d_ff"], vocab_size=LIMITS["vocab_size"], seq_len=LIMITS["seq_len"])
    assert cfg.head_dim == 128
    assert ModelConfig(d_model=LIMITS["head_dim"], n_head=1).head_dim == LIMITS["head_dim"]


def test_bad_input_names_the_argument():
    model = Transformer(ModelConfig(vocab_size=10, n_layer=1, n_head=1, d_model=8, seq_len=4))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_impl"):
        Transformer(ModelConfig(), attn_impl="naive")
    assert ModelConfig.from_dict(ModelConfig(arch="llama").to_dict()) == ModelConfig(arch="llama")
    # head_dim is written only where it is not d_model / n_head: older configs' dicts stay as they were
    assert "head_dim" not in ModelConfig(arch="qwen3").to_dict()
    qwen3 = ModelConfig(arch="qwen3", d_model=64, n_head=4, head_dim=24)
    assert qwen3.to_dict()["head_dim"] == 24 and ModelConfig.from_dict(qwen3.to_dict()) == qwen3
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"arch": "gpt2", "n_layers": 2})


@pytest.mark.parametrize("cfg_kw", CONFIGS + [dict(arch="gpt2", vocab_size=50, n_layer=2, n_head=2, d_model=16,
                                                   seq_len=8, tie_embeddings=False)], ids=lambda c: c["arch"])
def test_state_shapes_are_the_models(cfg_kw):
    # What loaders and exporters check a state dict against is exactly what the model holds.
    cfg = ModelConfig(**cfg_kw)
    assert cfg.state_shapes() == {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
