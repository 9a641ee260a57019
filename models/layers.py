"""The layers every step shares: RMSNorm, rotary embedding (one RoPE for every graph), causal local attention.

The segment, decode and chunk steps (model.py, decode.py, chunk.py), the GPU kernels' reference
(kernels/ops.py) and the full-attention baseline of the benchmarks all call these, so they agree by
construction rather than by copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. ``offset`` 1.0 is Gemma's (1 + w), its weights stored around 0, multiplied in
    float32 before the cast as transformers' Gemma3RMSNorm does; 0.0 is Llama's w, multiplied after the cast."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def gate_activation(name: str):
    """The MLP's gate function: "silu" (SwiGLU) or "gelu_tanh" (GeGLU; transformers' gelu_pytorch_tanh)."""
    return F.silu if name == "silu" else lambda x: F.gelu(x, approximate="tanh")


def positions(start, n: int, device=None) -> torch.Tensor:
    """Positions start..start+n-1: ``start`` an int (or a symbolic size, in an export) gives (n,); a (B,)
    tensor gives (B, n), one run of positions per row (the decode and chunk steps')."""
    steps = torch.arange(n, device=device)
    if isinstance(start, torch.Tensor):
        return start.to(steps.device)[:, None] + steps                                     # (B, n)
    return torch.arange(start, start + n, device=device)                                  # (n,)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


_TABLES: dict = {}   # (frequencies, factor, d, device) -> (cos, sin, r, theta): positions 0..len-1


def _cos_sin_table(theta, factor: float, d: int, device, length: int):
    """cos and sin (L, r) of positions 0..L-1 (L >= length, grown by doubling), what :func:`rope` computes
    for them, made once (outside inference mode, so training may use them too)."""
    key = (theta if not isinstance(theta, torch.Tensor) else id(theta), factor, d, str(device))
    held = _TABLES.get(key)
    if held is not None and held[0].shape[0] >= length and (not isinstance(theta, torch.Tensor) or held[3] is theta):
        return held[:3]
    size = max(length, 2 * held[0].shape[0] if held is not None else 256)
    with torch.inference_mode(False), torch.no_grad():
        if isinstance(theta, torch.Tensor):
            inv_freq = theta.to(device)
        else:
            inv_freq = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
    _TABLES[key] = (cos, sin, 2 * inv_freq.shape[0], theta)
    return _TABLES[key][:3]


def rope(x: torch.Tensor, theta, pos: torch.Tensor | int | None = None, factor: float = 1.0) -> torch.Tensor:
    """Rotary embedding, Llama's rotate-half layout. x: (B, H, n, d).

    ``theta``: the base, a float (plain RoPE over all d dims), or a layer's inverse frequencies, a float32 tensor
    (r/2,) from :func:`rope_frequencies` (scaled RoPE; r < d turns the first r dims and passes the rest, Phi-4's
    partial rotary). ``factor`` scales cos and sin (YaRN's and LongRoPE's attention factor).
    ``pos``: the position of each of the n tokens, (n,) shared by the rows or (B, n) per row
    (:func:`positions`), or an int ``start`` for start..start+n-1; None means 0..n-1. The segment step uses
    segment-local positions, so it is the same function for every segment; the memory path has no positions at
    all. Run eagerly, the cos and sin of positions 0.. are computed once per layer's frequencies and kept
    (:func:`_cos_sin_table`); traced (export, compile) they are computed in the graph.
    """
    n, d = x.shape[-2], x.shape[-1]
    if pos is None or isinstance(pos, (int, torch.SymInt)):   # a start (symbolic in a trace)
        start = pos or 0
        if not _tracing() and isinstance(start, int) and isinstance(n, int):
            cos, sin, r = _cos_sin_table(theta, factor, d, x.device, start + n)
            return _turn(x, cos[start:start + n], sin[start:start + n], r)
        pos = positions(start, n, x.device)
    if isinstance(theta, torch.Tensor):
        inv_freq = theta.to(x.device)                                                        # (r/2,)
    else:
        inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)   # (d/2,)
    r = 2 * inv_freq.shape[0]
    pos = pos.to(device=x.device, dtype=torch.float32)
    pos = pos[:, None] if pos.dim() == 1 else pos[:, None, :, None]                          # (n, 1) | (B, 1, n, 1)
    angles = pos * inv_freq                                                                  # (..., n, r/2)
    angles = torch.cat((angles, angles), dim=-1)                                             # (..., n, r)
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return _turn(x, cos, sin, r)


def _turn(x, cos, sin, r: int):
    """x's first r dims turned by cos and sin (..., n, r) (rotate-half), the rest passed as they are."""
    d = x.shape[-1]
    turned, kept = (x, None) if r == d else (x[..., :r], x[..., r:])
    x1, x2 = turned.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (turned.float() * cos + rotated.float() * sin).to(x.dtype)
    return out if kept is None else torch.cat((out, kept), dim=-1)


def rope_frequencies(config, layer: int = 0):
    """(theta, factor) for :func:`rope` in layer ``layer``: the base itself (a float) for plain RoPE, else the
    layer's inverse frequencies (float32 (r/2,), CPU) and the attention factor, computed as transformers'
    modeling_rope_utils does for the scaling's rope_type.

    Every scaling here depends on the position only, so it is exact within a segment. "dynamic" is plain RoPE:
    transformers rescales only a sequence longer than max_position_embeddings, and the config refuses a segment
    that long; "longrope" uses its short factors for the same reason (original_max_position_embeddings).
    """
    theta, scaling = config.layer_rope(layer)
    kind = None if scaling is None else scaling["rope_type"]
    if kind in (None, "dynamic") and config.rotary_dim is None:
        return theta, 1.0
    dim = config.rotary_dim or config.d_head
    with torch.device("cpu"):   # real numbers even while a model is built on the meta device
        base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))   # (r/2,)
        if kind in (None, "dynamic"):
            return base, 1.0
        return SCALINGS[kind](base, scaling, theta, dim)


def _linear(base, p, theta, dim):
    return base / p["factor"], 1.0


def _llama3(base, p, theta, dim):
    """Llama 3.1+: long wavelengths divided by factor, short ones kept, a smooth ramp between."""
    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / p["factor"], base)
    smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
        p["high_freq_factor"] - p["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / p["factor"] + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn(base, p, theta, dim):
    """YaRN (static): interpolated low frequencies, extrapolated high ones, a linear ramp between."""
    def correction_dim(rotations):
        return dim * math.log(p["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(p["beta_fast"]), correction_dim(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (p["factor"] * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, p["attention_factor"]


def _longrope(base, p, theta, dim):
    """LongRoPE (Phi-3/4) with its short factors: the ones transformers uses up to original_max_position_embeddings."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * theta ** shape), p["attention_factor"]


SCALINGS = {"linear": _linear, "llama3": _llama3, "yarn": _yarn, "longrope": _longrope}


def local_attention(q, k, v, past=None, scale: float | None = None):
    """Causal softmax attention inside the segment (Eq 6). q: (B, H, n, d); k, v: (B, H_kv, past + n, d).
    ``scale``: of the logits q k^T; None is 1/sqrt(d).

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
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # key j <= past + i, from the shapes alone (past = m - n), so an export keeps it symbolic
    visible = (torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n))
    if q.dtype != torch.float32:   # in float32, as the decode and chunk steps attend over their float32 cache
        # (and torch.onnx's masked decomposition would scale a half q by a float32 constant: an invalid graph)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible,
                                              scale=scale).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
