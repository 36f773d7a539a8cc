"""flash_attn.layers.rotary.apply_rotary_emb in plain torch: the suite's reference for the rotary embedding that
flash_attn_with_kvcache applies."""

import torch


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """x [batch, seqlen, heads, head_dim]; cos, sin [seqlen_ro, rotary_dim / 2]. The first rotary_dim channels of
    token t are rotated by the angle of row t + offset (offset an int or one per batch row); interleaved rotates
    channel pairs (0, 1), (2, 3), ..., otherwise (i, i + rotary_dim / 2). Returns the result (x itself if inplace)."""
    if cu_seqlens is not None or max_seqlen is not None:
        raise NotImplementedError("cu_seqlens: the suite's reference never passes packed sequences")
    batch, seqlen = x.shape[:2]
    half = cos.shape[-1]
    rows = torch.arange(seqlen, device=x.device).unsqueeze(0)
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).to(torch.long).reshape(-1, 1)
    positions = (rows + offsets).expand(batch, seqlen)
    work = torch.promote_types(x.dtype, torch.float32)  # float32 at least, as flash-attn's kernel computes
    c = cos[positions].unsqueeze(2).to(work)  # [batch, seqlen, 1, half]
    s = sin[positions].unsqueeze(2).to(work)
    rot = x[..., :2 * half].to(work)
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        rotated = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    out = torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)
    return x.copy_(out) if inplace else out
