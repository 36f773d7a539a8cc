"""Independent torch references for the kernel tests: attention (padded, packed, paged), linear layers and
mixture-of-experts routing and expert feed-forward (a loop over tokens and their experts).

`attention` is the contract of csrc/include/flashlm/attention/flash_attention.h written as plain torch:
GQA/MQA (K/V heads repeated over their query group), scores scale * q.k or softcap * tanh(scale * q.k /
softcap) plus, with ALiBi slopes, -slope * |i + Sk - Sq - j| (flash-attn's bias, added in at least float32 as
its reference does), a bottom-right aligned band (query i of Sq sees keys i + Sk - Sq - window_left ... i + Sk - Sq +
window_right, a negative side unbounded, causal meaning window_right = 0), and a row that sees no key giving
out = 0 and lse = +inf. It runs in the dtype of its inputs and is differentiable: float64 inputs give the
reference (backward tests call autograd on it), the kernel's own dtype gives the low-precision baseline of
flash-attn's tolerance rule (compare.py). NaN and inf propagate as softmax and IEEE arithmetic make them
(the rule csrc/attention/shared_softmax.h states), and what a query does not see, K or V, never reaches it.
"""

import math

import torch


def visible(sq, sk, causal=False, window=(-1, -1), device=None):
    """[sq, sk] bool: which keys each query sees, bottom-right aligned."""
    left, right = window[0], 0 if causal else window[1]
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def band_edges(sq, sk, causal=False, window=(-1, -1)):
    """The keys just outside some query's band (the key before its first, the key after its last), sorted: what
    its neighbours may see and it must not."""
    edges = set()
    for row in visible(sq, sk, causal, window):
        keys = row.nonzero().flatten().tolist()
        if keys:
            edges.update(j for j in (keys[0] - 1, keys[-1] + 1) if 0 <= j < sk)
    return sorted(edges)


def alibi_bias(slopes, sq, sk, dtype=torch.float64):
    """[B or 1, H, sq, sk]: -slope * |i + sk - sq - j| for slopes [H] or [B, H], in `dtype`."""
    slopes = slopes.to(dtype)
    slopes = slopes[None] if slopes.dim() == 1 else slopes
    i = torch.arange(sq, device=slopes.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=slopes.device)[None, :]
    return -slopes[:, :, None, None] * (i - j).abs().to(dtype)


def _padded(q, k, v, causal, window, softcap, scale, p_dtype, alibi_slopes=None, dropout=None):
    """q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, H, D], lse [B, H, Sq]. dropout: (keep [B, H, >= Sq,
    >= Sk] bool, p): P's kept elements scaled by 1 / (1 - p), the others 0, before P @ V (lse is P's before)."""
    sq, sk, heads = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, sq, sk, torch.promote_types(s.dtype, torch.float32))
    mask = visible(sq, sk, causal, window, q.device)
    seen = mask.any(-1)
    # Rows that see no key get finite scores, so that softmax and its gradient stay free of NaN; the mask
    # then zeroes their probabilities.
    s = s.masked_fill(~mask, -math.inf).masked_fill(~seen[:, None], 0.0)
    lse = torch.logsumexp(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    p = torch.softmax(s, dim=-1).masked_fill(~mask, 0.0)
    if dropout is not None:
        keep, rate = dropout
        p = p.masked_fill(~keep[:, :, :sq, :sk].to(p.device), 0.0) / (1 - rate)
    p = p.to(v.dtype)  # ALiBi's bias promotes bf16 scores to float32
    if p_dtype is not None:  # the kernel rounds P to its input dtype before P @ V
        p = p.to(p_dtype).to(v.dtype)
    if torch.isfinite(v).all():
        out = torch.einsum("bhij,bjhd->bihd", p, v)
    else:  # a key the query does not see must not reach it, as 0 * NaN in the product would
        out = (p[..., None] * v.transpose(1, 2)[:, :, None]).where(mask[..., None], 0.0).sum(-2).transpose(1, 2)
    return out, lse.masked_fill(~seen, math.inf)


def attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, scale=None, cu_seqlens_q=None,
              cu_seqlens_k=None, p_dtype=None, alibi_slopes=None, dropout=None):
    """Attention in the inputs' dtype (the score rows' logsumexp in at least float32).

    Padded: q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, H, D], lse [B, H, Sq]. Packed (cu_seqlens_q/k
    given, [B + 1] cumulative lengths): q [Tq, H, D], k/v [Tk, Hkv, D] -> out [Tq, H, D], lse [H, Tq]; rows
    outside every sequence get out 0 and lse +inf. p_dtype rounds the probabilities before P @ V.
    alibi_slopes: float32 [H] or [B, H] (packed: sequence b takes row b). dropout: (keep [B, H, Sq, Sk] bool,
    p), keep[b] indexed by sequence b's own rows and columns (see _padded).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    opts = (causal, window, softcap, scale, p_dtype)
    if cu_seqlens_q is None:
        return _padded(q, k, v, *opts, alibi_slopes, dropout)
    cu_q, cu_k = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    outs = [q.new_zeros((cu_q[0],) + q.shape[1:])]
    lses = [torch.full((q.shape[1], cu_q[0]), math.inf, dtype=torch.float64, device=q.device)]
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        slopes = None if alibi_slopes is None else alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        drop = None if dropout is None else (dropout[0][b:b + 1], dropout[1])
        out, lse = _padded(q[None, qs], k[None, ks], v[None, ks], *opts, slopes, drop)
        outs.append(out[0])
        lses.append(lse[0].double())
    tail = q.shape[0] - cu_q[-1]
    outs.append(q.new_zeros((tail,) + q.shape[1:]))
    lses.append(torch.full((q.shape[1], tail), math.inf, dtype=torch.float64, device=q.device))
    lse = torch.cat(lses, dim=1)
    return torch.cat(outs), lse.to(torch.promote_types(q.dtype, torch.float32))


def attention_with_grads(q, k, v, dout=None, **opts):
    """(out, lse, (dq, dk, dv)) of `attention` on leaves copied from q, k, v; the gradients are those of
    sum(out * dout), or None without dout."""
    leaves = [x.detach().clone().requires_grad_(dout is not None) for x in (q, k, v)]
    out, lse = attention(*leaves, **opts)
    if dout is None:
        return out.detach(), lse.detach(), None
    if out.numel() == 0:
        return out.detach(), lse.detach(), tuple(torch.zeros_like(x) for x in leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))
    return out.detach(), lse.detach(), grads


def gather_paged(cache, block_table, seq, n):
    """Tokens 0 .. n - 1 of sequence `seq` from a paged cache [blocks, block_size, Hkv, D]: [n, Hkv, D]."""
    t = torch.arange(n, device=cache.device)
    block_size = cache.shape[1]
    return cache[block_table[seq, t // block_size].long(), t % block_size]


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q=None, **opts):
    """`attention` over K/V gathered from paged caches (cast to q's dtype): out [Tq, H, D], lse [H, Tq].

    Decode: q [num_seqs, H, D], one query per sequence. Prefill: q packed [Tq, H, D] by cu_seqlens_q. Sequence
    s has seq_lens[s] tokens of context, its queries being the last ones (bottom-right alignment).
    """
    lens = [int(n) for n in seq_lens]
    if cu_seqlens_q is None:
        cu_seqlens_q = list(range(len(lens) + 1))
    k = torch.cat([gather_paged(k_cache, block_table, s, n) for s, n in enumerate(lens)]).to(q.dtype)
    v = torch.cat([gather_paged(v_cache, block_table, s, n) for s, n in enumerate(lens)]).to(q.dtype)
    cu_k = [0]
    for n in lens:
        cu_k.append(cu_k[-1] + n)
    return attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_k, **opts)


def linear(x, w, bias=None):
    """x @ w.T + bias in float64: x [..., K], w [N, K], bias [N]."""
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


# --- mixture of experts --------------------------------------------------------------------------------------

def moe_route(logits, k, softmax_first, renormalize):
    """(weights float64, experts int64) by a stable descending sort: equal values keep the lower index first."""
    l64 = logits.double()
    if softmax_first:
        p = torch.softmax(l64, -1)
        vals, idx = torch.sort(p, dim=-1, descending=True, stable=True)
        vals, idx = vals[:, :k], idx[:, :k]
        if renormalize:
            vals = vals / vals.sum(-1, keepdim=True)
        return vals, idx
    vals, idx = torch.sort(l64, dim=-1, descending=True, stable=True)
    return torch.softmax(vals[:, :k], -1), idx[:, :k]


def moe_activate(g, activation):
    """The expert activation: "silu" or "gelu_tanh" (tanh-approximated GELU)."""
    return torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")


def moe_expert_ffn(x, weights, experts, gate, up, down, activation="silu", dtype=torch.float64):
    """The expert feed-forward as a loop over tokens and their experts in `dtype` (autograd flows through)."""
    out = []
    for t in range(x.shape[0]):
        acc = 0
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            xt = x[t].to(dtype)
            h = moe_activate(gate[e].to(dtype) @ xt, activation) * (up[e].to(dtype) @ xt)
            acc = acc + weights[t, j].to(dtype) * (down[e].to(dtype) @ h)
        out.append(acc)
    return torch.stack(out)
