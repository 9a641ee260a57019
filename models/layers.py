"""The layers every step shares: RMSNorm, rotary embedding (one RoPE for every graph), causal local attention.

The segment, decode and chunk steps (model.py, decode.py, chunk.py), the GPU kernels' reference
(kernels/ops.py) and the full-attention baseline of the benchmarks all call these, so they agree by
construction rather than by copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def positions(start, n: int, device=None) -> torch.Tensor:
    """Positions start..start+n-1: ``start`` an int (or a symbolic size, in an export) gives (n,); a (B,)
    tensor gives (B, n), one run of positions per row (the decode and chunk steps')."""
    steps = torch.arange(n, device=device)
    if isinstance(start, torch.Tensor):
        return start.to(steps.device)[:, None] + steps                                     # (B, n)
    return torch.arange(start, start + n, device=device)                                  # (n,)


def rope(x: torch.Tensor, theta: float, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding, Llama's rotate-half layout. x: (B, H, n, d).

    ``pos``: the position of each of the n tokens, (n,) shared by the rows or (B, n) per row
    (:func:`positions`); None means 0..n-1. The segment step uses segment-local positions, so it is the same
    function for every segment; the memory path has no positions at all.
    """
    n, d = x.shape[-2], x.shape[-1]
    if pos is None:
        pos = torch.arange(n, device=x.device)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)   # (d/2,)
    pos = pos.to(device=x.device, dtype=torch.float32)
    pos = pos[:, None] if pos.dim() == 1 else pos[:, None, :, None]                          # (n, 1) | (B, 1, n, 1)
    angles = pos * inv_freq                                                                  # (..., n, d/2)
    angles = torch.cat((angles, angles), dim=-1)                                             # (..., n, d)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * angles.cos() + rotated.float() * angles.sin()).to(x.dtype)


def local_attention(q, k, v, past=None):
    """Causal softmax attention inside the segment (Eq 6). q: (B, H, n, d); k, v: (B, H_kv, past + n, d).

    With grouped-query attention each KV head is repeated for its G = H / H_kv query heads (Llama's
    repeat_kv: query head h reads KV head h // G); without it (G = 1) the graph has no repeat at all.
    ``past`` (None: none): k and v open with that many keys of the previous segment, which every query sees
    (query i sits at position past + i); 0 is legal (a stream's first segment) and may be symbolic (export).
    """
    B, H, n, d = q.shape
    m = k.shape[2]
    if H != k.shape[1]:   # expand + reshape, as transformers does: exports as Expand/Reshape, no copy in torch
        k, v = (t[:, :, None].expand(B, t.shape[1], H // t.shape[1], m, d).reshape(B, H, m, d)
                for t in (k, v))                                                        # (B, H, m, d)
    if past is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # key j <= past + i, from the shapes alone (past = m - n), so an export keeps it symbolic
    visible = (torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
