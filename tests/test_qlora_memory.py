"""QLoRA on a GGUF base keeps the base in its blocks: a fresh process that loads a Q4_K_M file and takes
LoRA steps on it grows by about the file's size plus the adapters and activations, not by a float copy."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from flashlm.models import ModelConfig, Transformer

# Runs in a fresh interpreter: RSS after the imports (and torch's lazy ones), then the peak (VmHWM) after
# loading the base as `flashlm finetune --method qlora` does and taking LoRA steps with AdamW on every block
# linear.
CHILD = r"""
import json, sys
import torch
import flashlm
from flashlm.train.finetune import load_base, return_freed_blocks
from flashlm.train.optim import AdamW
from flashlm.train.peft import apply_lora, trainable_parameters

def status(key):  # bytes, from /proc/self/status (VmRSS: now; VmHWM: the peak since exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

path, r, steps, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
w = torch.zeros(4, requires_grad=True)  # torch imports its optimiser machinery on first use (~70 MiB):
opt = AdamW([w])                        # the interpreter's, not the base's
(w * 2).sum().backward()
opt.step()
base_rss = status("VmRSS")
return_freed_blocks()  # as the fine-tune trainer does before it loads the base
model = load_base(path, "qlora").model
model.requires_grad_(False)
apply_lora(model, r=r, alpha=2 * r, targets="q,k,v,o,gate,up,down")
model.train()
params = trainable_parameters(model)
opt = AdamW(params, lr=1e-3)
torch.manual_seed(0)
for _ in range(steps):
    x = torch.randint(0, model.cfg.vocab_size, (1, seq + 1))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = status("VmHWM")  # not ru_maxrss, which counts the forked parent's pages too
print(json.dumps({"growth": peak - base_rss, "adapter_numel": sum(p.numel() for p in params),
                  "loss": loss.item()}))
"""

MIB = 1 << 20
# What a process takes beyond the weights and the adapters' state on its first steps: the thread pools'
# stacks, allocator arenas, autograd's bookkeeping, the activations kept for backward and the logits (here
# 32 tokens: a few MiB). Measured on this model: 38 MiB of growth beyond the file, of which the adapters' state
# is under 10 MiB; 64 MiB leaves room for other allocators and machines, and keeps the bound (file + adapters
# + this, about 105 MiB) at about half the 194 MiB float copy.
OVERHEAD = 64 * MIB
# The most that 32 more tokens a step may add to the peak: the activations kept for backward, about 0.3 MiB a
# token on this model (4 layers, 7 LoRA targets each), with room for the allocator's rounding.
TOKENS_32_MORE = 16 * MIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_qlora_on_a_gguf_base_grows_memory_by_the_file_not_a_float_copy(tmp_path):
    from flashlm.train.export import export_gguf

    cfg = ModelConfig(arch="llama", vocab_size=256, n_layer=4, n_head=8, d_model=1024, seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())  # the float32 copy a dequantizing tool holds
    path = tmp_path / "Q4_K_M.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer: the steps need none
        export_gguf(model, cfg, None, str(path), type="Q4_K_M")
    del model
    r = 8

    def steps(tokens):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(r), "3", str(tokens)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    res, res64 = steps(32), steps(64)
    assert torch.isfinite(torch.tensor(res["loss"]))
    # The bound: the file's bytes (the blocks, copied or mapped, once), the adapters' float32 values, gradients
    # and AdamW's two moments (16 bytes a parameter), and OVERHEAD. It must sit well below the float copy for
    # the test to tell the two apart: a process that dequantized the base would grow by float_bytes at least.
    file_bytes = path.stat().st_size
    bound = file_bytes + 16 * res["adapter_numel"] + OVERHEAD
    assert bound < 0.6 * float_bytes, (bound / MIB, float_bytes / MIB)
    assert res["growth"] < bound, (res["growth"] / MIB, file_bytes / MIB, bound / MIB, float_bytes / MIB)
    # 32 more tokens add their activations (measured: 9 MiB here); freed activation blocks that malloc kept in
    # the process instead of returning them added 30 MiB more (flashlm.train.finetune.return_freed_blocks).
    assert res64["growth"] - res["growth"] < TOKENS_32_MORE, ((res64["growth"] - res["growth"]) / MIB)
