"""The flashlm model's training path on its native kernels (RMSNorm, LayerNorm, GELU(tanh), SwiGLU and rope,
forward and backward; optionally the vocabulary-chunked loss), against the same model with those kernels switched off
(train_kernels=False: torch's formulas, the reference) and against the plain torch model (attn_impl="sdpa").

The kernels must run (checked in torch.profiler's record), give the reference's loss and gradients to float32
rounding, and leave a short training run's loss curve unchanged to float tolerance, in float32 and in bf16
autocast.
"""

import pytest
import torch
from torch.profiler import profile

from compare import assert_close
from flashlm.models import ModelConfig, Transformer
from flashlm.train.optim import AdamW

CONFIGS = {
    "gpt2": dict(arch="gpt2", vocab_size=97, n_layer=2, n_head=4, d_model=64, seq_len=40),
    "llama": dict(arch="llama", vocab_size=61, n_layer=2, n_head=6, n_kv_head=2, d_model=96, seq_len=40,
                  tie_embeddings=False),
    "qwen3": dict(arch="qwen3", vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=20, seq_len=40),
    "gemma2": dict(arch="gemma2", vocab_size=71, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=24,
                   seq_len=40, sliding_window=6, attn_softcap=2.0, final_softcap=3.0, query_pre_attn_scalar=20),
}
# the native ops each architecture's training step must run (their backward kernels included)
KERNELS = {
    "gpt2": ("flashlm::layer_norm", "flashlm::layer_norm_backward", "flashlm::gelu_tanh",
             "flashlm::gelu_tanh_backward"),
    "llama": ("flashlm::rms_norm_train", "flashlm::rms_norm_backward", "flashlm::silu_mul",
              "flashlm::silu_mul_backward", "flashlm::rope", "flashlm::rope_backward"),
    "qwen3": ("flashlm::rms_norm_backward", "flashlm::silu_mul_backward", "flashlm::rope_backward"),
    "gemma2": ("flashlm::rms_norm_backward", "flashlm::gelu_tanh_backward", "flashlm::rope_backward"),
}


def without_train_kernels(model):
    for module in model.modules():
        if hasattr(module, "train_kernels"):
            module.train_kernels = False
    return model


def pair(arch, seed=0):
    """(model on the kernels, the same weights with train_kernels off), both in training mode."""
    cfg = ModelConfig(**CONFIGS[arch])
    torch.manual_seed(seed)
    ours = Transformer(cfg)
    ref = without_train_kernels(Transformer(cfg))
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():  # norm weights off 1 so that their gradients show
        for a, b in zip(ours.parameters(), ref.parameters()):
            if a.dim() == 1:
                a.add_(torch.randn_like(a) * 0.1)
                b.copy_(a)
    return cfg, ours, ref


def batch(cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len - 3), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, idx.shape, generator=gen)
    targets[0, :4] = -100
    return idx, targets


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_kernels_run_and_match_torch_layers(arch):
    cfg, ours, ref = pair(arch)
    idx, targets = batch(cfg, 1)
    with profile() as prof:
        _, loss = ours(idx, targets)
        loss.backward()
    ran = {e.key for e in prof.key_averages()}
    missing = [k for k in KERNELS[arch] if k not in ran]
    assert not missing, f"{arch}: the training step did not run {missing}"
    _, want = ref(idx, targets)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    assert_grads_close(ours, ref, 1e-5, arch)


def assert_grads_close(ours, ref, rtol, label):
    """Each gradient within rtol of the reference's, plus rtol of the largest gradient of the model (some are
    zero but for rounding: a key bias's, under softmax)."""
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_close(a.grad, b.grad, atol=rtol * scale, rtol=rtol, rtol_of_max=rtol, name=f"{label} {name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loss_curve_unchanged(arch, dtype):
    """Eight AdamW steps on the kernels and on torch's layers: the same losses to float tolerance (bf16
    autocast: to its rounding, which the two paths share but for the order of a few f32 sums)."""
    cfg, ours, ref = pair(arch, seed=2)
    curves = []
    for model in (ours, ref):
        opt = AdamW(model.param_groups(0.1), lr=3e-3)
        losses = []
        for _ in range(8):
            idx, targets = batch(cfg, 100)  # one batch: the loss must fall
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, loss = model(idx, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert curves[0][-1] < curves[0][0]  # it trains
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(curves[0], curves[1], rtol=rtol, name=f"{arch} {dtype} loss curve")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_fused_loss(arch):
    """fused_loss: (None, loss) from the chunked loss kernel, the logits path's loss and gradients (gemma2's
    soft-capped logits keep the logits path)."""
    cfg, ours, ref = pair(arch, seed=3)
    ours.fused_loss = True
    idx, targets = batch(cfg, 5)
    logits, loss = ours(idx, targets)
    assert (logits is None) == (cfg.final_softcap is None)
    _, want = ref(idx, targets)
    loss.backward()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_grads_close(ours, ref, 1e-4, arch)
    logits, _ = ours(idx)  # without targets: the logits, as always
    assert logits.shape == (*idx.shape, cfg.vocab_size)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_inference_and_sdpa_model_keep_torch_layers(arch):
    cfg = ModelConfig(**CONFIGS[arch])
    sdpa = Transformer(cfg, attn_impl="sdpa")
    assert not any(getattr(m, "train_kernels", False) for m in sdpa.modules())
    idx, targets = batch(cfg, 7)
    with profile() as prof:
        sdpa(idx, targets)[1].backward()
    assert not [e.key for e in prof.key_averages() if e.key.startswith("flashlm::")]
