"""generate: the plainest sampler, recomputing the whole window each step (no KV cache, no batching rules).

    out = generate(model, idx, 32, temperature=0)     # idx int64 [B, T] -> [B, T + up to 32]

The engine (flashlm.runtime.engine.LLM) is the fast path; this one is what the trainer samples with and
what the tests compare the engine with.
"""

from typing import Optional

import torch

from flashlm.models import Transformer


@torch.no_grad()
def generate(model: Transformer, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             eos_token_id: Optional[int] = None) -> torch.Tensor:
    """Appends max_new_tokens sampled tokens to idx [B, T], each from the model's logits over the last seq_len
    tokens. temperature 0 is greedy. Stops early when every row has produced eos_token_id."""
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k: must be positive, got {top_k}")
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.cfg.seq_len:])
        logits = logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat((idx, nxt), dim=1)
        if eos_token_id is not None:
            done |= nxt[:, 0] == eos_token_id
            if bool(done.all()):
                break
    return idx
