"""The chunk step: n tokens appended to the unfinished segment, at the cost of those n tokens.

The decode step (models/decode.py) for several tokens at once: the tokens at positions pos..pos+n-1 of the
current segment write their keys and values into the in-segment KV cache, attend causally to every slot up to
their own, read the memory without changing it, and add their part to the pending update (dM, dz). So a
stream fed in small pieces (a chat turn, a live transcript) pays for the pieces, not for the whole unfinished
segment on every call. Both update rules decompose per token given M_prev (decode.py), so any chunking gives
the teacher-forced logits; the segment is committed by the segment step when it fills (runtime/feeding.py).

    tokens (B, n), pos (B,) --embed--> x (B, n, D)
      q, k, v = attn.project(rmsnorm(x))                 (B, H, n, d); k, v (B, H_kv, n, d)
      k_cache[:, :, pos + i] = rope(k_i, pos + i)        one-hot writes: static shapes, no indexing by value
      a_dot = softmax(rope(q, pos + i) k_cache^T / sqrt(d), slots <= pos + i) v_cache
      a, dM, dz = memory_decode(q, k, v, a_dot, M, z, dM, dz)     M, z: read only
      x = block.feed_forward(x, o_proj(a))              the residual, the MLP (and Gemma's output norms)
    logits = lm_head(rmsnorm(x))                         (B, n, V)

The caller keeps pos + n <= N (the segment length).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decode import memory_decode_reference, rotated_past, stacked, with_past, write_cache
from .layers import positions
from .model import Block, InfiniAttention, InfiniTransformer


def chunk_cache_attention(q, k, v, pos, k_cache, v_cache, scale: float | None = None, past=None,
                          inplace: bool = False):
    """Write n (k, v) at slots pos..pos+n-1 and attend causally to slots 0..pos+i. Static shapes.

    q: (B, H, n, d), k: (B, H_kv, n, d) with RoPE; v: (B, H_kv, n, d); pos: (B,); caches (B, H_kv, N, d) f32.
    The G = H / H_kv query heads of a group attend as G * n query rows of their KV head. ``scale``: of the
    logits (None: 1/sqrt(d)). ``past`` (attend_previous): (keys with RoPE, values) (B, H_kv, m, d), seen by
    every query before the cache (models/decode.with_past).
    Returns (a_dot (B, H, n, d), k_cache_out, v_cache_out): the caches themselves when ``inplace``.
    """
    B, H, n, d = q.shape
    H_kv = k_cache.shape[1]
    at = pos[:, None] + torch.arange(n, device=pos.device)                                  # (B, n)
    k_cache, v_cache = write_cache(k_cache, v_cache, k, v, at, inplace)
    keys, values, visible = with_past(k_cache, v_cache, at, past)                           # (B, n, m + N)
    G, width = H // H_kv, keys.shape[2]
    mask = visible.unsqueeze(1).expand(B, G, n, width).reshape(B, 1, G * n, width)          # (B, 1, G*n, m+N)
    grouped = q.float().reshape(B, H_kv, G * n, d)                                          # (B, H_kv, G*n, d)
    a_dot = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return a_dot.reshape(B, H, n, d).to(q.dtype), k_cache, v_cache


def attention_chunk(attn: InfiniAttention, x, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past=None,
                    inplace: bool = False):
    """InfiniAttention for n tokens of the unfinished segment. x: (B, n, D); ``past`` as for
    models/decode.attention_decode. Returns (y, k_c, v_c, dM, dz)."""
    cfg = attn.config
    B, n, _ = x.shape
    q, k, v = attn.project(x)                                                       # (B, H, n, d), (B, H_kv, n, d)
    m = 0 if past is None else past[0].shape[2]
    at = positions(pos + m, n)                                                      # (B, n): after the past
    a_dot, k_cache, v_cache = chunk_cache_attention(attn.rotate(q, at), attn.rotate(k, at), v, pos, k_cache,
                                                    v_cache, cfg.query_scale, rotated_past(attn, past, k.dtype),
                                                    inplace)
    a, d_memory, d_norm = memory_decode_reference(q, k, v, a_dot, memory, norm, d_memory, d_norm, attn.beta,
                                                  cfg.update == "delta", cfg.eps)
    y = attn.o_proj(a.transpose(1, 2).reshape(B, n, cfg.n_head * cfg.d_head))
    return y, k_cache, v_cache, d_memory, d_norm


def block_chunk(block: Block, x, pos, *state, inplace: bool = False):
    h, *state = attention_chunk(block.self_attn, block.input_layernorm(x), pos, *state, inplace=inplace)
    return (block.feed_forward(x, h), *state)


def chunk_step(model: InfiniTransformer, tokens, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past=None,
               inplace: bool = False, logits_from: int = 0):
    """The chunk step, a pure function (see the module docstring); ``inplace`` as models/decode.decode_step.

    tokens: (B, n) int64; pos: (B,) int64, the tokens already in the segment (pos + n <= N); memory, norm:
    read only; the decode state as models/decode.decode_step takes it. Returns (logits (B, n, V), k_cache_out,
    v_cache_out, d_memory_out, d_norm_out): new tensors. Inputs are not checked here (runners check them).
    ``past``: attend_previous models, as models/decode.decode_step takes it. ``logits_from``: as
    InfiniTransformer.step's (the logits of positions logits_from..n-1 only).
    """
    x = model.embed(tokens)                                                  # (B, n, D)
    outs = []
    for i, layer in enumerate(model.layers):
        x, *state = block_chunk(layer, x, pos, memory[i], norm[i], k_cache[i], v_cache[i], d_memory[i], d_norm[i],
                                None if past is None else (past[i, 0], past[i, 1]), inplace=inplace)
        outs.append(state)
    logits = model.lm_head(model.norm(x[:, logits_from:] if logits_from else x))   # (B, n - logits_from, V)
    return (logits, *stacked(outs, k_cache, v_cache, inplace))


class ChunkStep(nn.Module):
    """``chunk_step`` as a module's forward, for exporters that take an ``nn.Module``."""

    def __init__(self, model: InfiniTransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past=None):
        return chunk_step(self.model, tokens, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past)
