"""The decode step: one token in, logits out, the memory read but not changed.

A pure function of fixed-shape tensors, so it exports to one ONNX graph
(``decode.onnx``) and suits TensorRT and CUDA graphs. Per layer:

    token (B,), pos (B,) --embed--> x (B, 1, D)
      q, k, v = attn.project(rmsnorm(x))                      (B, H, 1, d); k, v (B, H_kv, 1, d)
      k_cache[:, :, pos] = rope(k, pos)    v_cache[:, :, pos] = v      (a where() on a one-hot slot)
      a_dot = softmax(rope(q, pos) k_cache^T / sqrt(d), slots <= pos) v_cache
      a, dM, dz = memory_decode(q, k, v, a_dot, M, z, dM, dz)  M, z: read only (retrieval uses M_prev)
      x = block.feed_forward(x, o_proj(a))                   the residual, the MLP (and Gemma's output norms)
    logits = lm_head(rmsnorm(x))                              (B, V)

The pending update (dM, dz) of the unfinished segment is accumulated token by
token; both rules decompose per token given M_prev (paper Eqs 8-9):

    linear: dM += sk_t^T v_t        delta: dM += sk_t^T (v_t - sk_t M_prev / (sk_t z_prev + eps))
    both:   dz += sk_t

After the token at pos = N - 1 the caller folds (M += dM, z += dz, see
:func:`fold`) and restarts at pos = 0 with dM = dz = 0; the cache needs no
clearing because slots > pos are masked. So N decoded tokens leave the state the
segment step leaves, and their logits are the segment step's teacher-forced logits.

An ``attend_previous`` model also reads ``past`` (L, 2, B, H_kv, m, d), the keys and values the segment step
carried (the stream's first SINKS tokens and the previous segment, without RoPE): the query sees them at
positions 0..m-1 (RoPE applied here) before the cache, whose slot t sits at position m + t. The decode step
never writes past: the caller commits a filled segment with the segment step instead of folding, which gives
the next past and the same (M, z) (runtime/stream.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import InfiniConfig
from .memory import float32_path, retrieve, sigma
from .layers import positions
from .model import Block, InfiniAttention, InfiniTransformer


@float32_path
def memory_decode_reference(q, k, v, a_dot, memory, norm, d_memory, d_norm, beta, delta: bool, eps: float):
    """The memory block for one token: retrieval from M_prev, the gate, and the pending update.

    q, a_dot: (B, H, n, d); k, v: (B, H_kv, n, d), n = 1 (or n tokens: the chunk step); q and k *without* RoPE.  memory, norm:
    (B, H_kv, d, d), (B, H_kv, d) f32, M_prev and z_prev (read only).  d_memory, d_norm: the segment's
    pending update so far (f32, per KV head). Returns (a, d_memory_out, d_norm_out). Same float32 math
    as memory.memory_reference.
    """
    sq, sk = sigma(q.float()), sigma(k.float())                          # (B, H, 1, d), (B, H_kv, 1, d)
    a_mem = retrieve(sq, memory, norm, eps)                              # Eq 7, M_prev
    g = torch.sigmoid(beta.float()).view(1, -1, 1, 1)                    # (1, H, 1, 1)
    a = g * a_mem + (1.0 - g) * a_dot.float()                            # Eq 10
    v_new = v.float()
    if delta:                                                            # Eq 9, per token, against M_prev
        v_new = v_new - (sk @ memory) / (sk @ norm.unsqueeze(-1) + eps)
    d_memory_out = d_memory + sk.transpose(-1, -2) @ v_new               # (B, H_kv, d, d)
    d_norm_out = d_norm + sk.sum(dim=-2)                                 # (B, H_kv, d); n tokens: chunk.py
    return a.to(a_dot.dtype), d_memory_out, d_norm_out


def write_cache(k_cache, v_cache, k, v, at, inplace: bool):
    """(k, v) (B, H_kv, n, d) into the caches (B, H_kv, N, d) at slots ``at`` (B, n); returns the caches.

    Exported (``inplace`` False): a pure function of static shapes, no indexing by value (a one-hot product,
    exact: one 1.0 * value, the rest + 0). In torch (``inplace``): the n slots written where they are, so a
    token costs its own keys, not a copy of the cache (L x 2 x H_kv x N x d floats)."""
    B, _, N, _ = k_cache.shape
    if inplace:
        rows = torch.arange(B, device=at.device)[:, None]                                 # (B, 1)
        k_cache[rows, :, at] = k.float().transpose(1, 2)                                   # (B, n, H_kv, d)
        v_cache[rows, :, at] = v.float().transpose(1, 2)
        return k_cache, v_cache
    slots = torch.arange(N, device=at.device)                                              # (N,)
    if k.shape[2] == 1:                                                                    # the decode step
        written = (slots == at).view(B, 1, N, 1)                                           # (B, 1, N, 1)
        return torch.where(written, k.float(), k_cache), torch.where(written, v.float(), v_cache)
    onehot = slots.view(1, 1, N) == at[:, :, None]                                         # (B, n, N)
    written = onehot.any(dim=1).view(B, 1, N, 1)                                           # (B, 1, N, 1)
    place = onehot.to(torch.float32).transpose(1, 2).unsqueeze(1)                          # (B, 1, N, n)
    return torch.where(written, place @ k.float(), k_cache), torch.where(written, place @ v.float(), v_cache)


def cache_attention(q, k, v, pos, k_cache, v_cache, scale: float | None = None, past=None, inplace: bool = False):
    """Write (k, v) at slot ``pos`` and attend to slots 0..pos. Static shapes: no indexing by value.

    q: (B, H, 1, d), k: (B, H_kv, 1, d) with RoPE; v: (B, H_kv, 1, d); pos: (B,) int64; caches
    (B, H_kv, N, d) f32: one cache per KV head. The G = H / H_kv query heads of a group attend as G
    query rows of their KV head, (B, H_kv, G, d), so the cache is never repeated. ``scale``: of the logits
    (None: 1/sqrt(d)). ``past`` (attend_previous): (keys with RoPE, values), (B, H_kv, m, d) f32, which the
    token sees before the cache (:func:`with_past`).
    Returns (a_dot (B, H, 1, d), k_cache_out, v_cache_out): the caches themselves when ``inplace``.
    """
    B, H, _, d = q.shape
    k_cache, v_cache = write_cache(k_cache, v_cache, k, v, pos[:, None], inplace)   # ``inplace``: write_cache
    keys, values, visible = with_past(k_cache, v_cache, pos[:, None], past)        # visible (B, 1, m + N)
    grouped = q.float().reshape(B, k_cache.shape[1], -1, d)                        # (B, H_kv, G, d)
    a_dot = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible.unsqueeze(1), scale=scale)
    return a_dot.reshape(B, H, 1, d).to(q.dtype), k_cache, v_cache


def with_past(k_cache, v_cache, at, past=None):
    """The keys and values a query sees, and which: (keys, values (B, H_kv, m + N, d), visible (B, n, m + N)).

    ``at`` (B, n): each query's slot in the cache; it sees cache slots up to its own. ``past`` (attend_previous):
    (keys, values) (B, H_kv, m, d) carried from earlier segments, keys with RoPE at 0..m-1, which every query
    sees before the cache (whose slot t sits at position m + t). m may be 0, and symbolic in an export."""
    N = k_cache.shape[-2]
    if past is None:
        return k_cache, v_cache, torch.arange(N, device=at.device).view(1, 1, N) <= at[:, :, None]
    keys, values = (torch.cat((p.float(), c), dim=2) for p, c in zip(past, (k_cache, v_cache)))  # (B, H_kv, m+N, d)
    m = keys.shape[2] - N
    cols = torch.arange(keys.shape[2], device=at.device).view(1, 1, -1)                         # (1, 1, m+N)
    return keys, values, (cols < m) | (cols - m <= at[:, :, None])


def rotated_past(attn: InfiniAttention, past, dtype):
    """An attend_previous layer's past (keys, values) (B, H_kv, m, d) without RoPE -> keys with RoPE at
    positions 0..m-1, in the activations' ``dtype`` (float32 past cast as the segment step casts it, so that
    both round alike), values as they are; None stays None."""
    if past is None:
        return None
    keys, values = past
    return attn.rotate(keys.to(dtype)), values.to(dtype)


def attention_decode(attn: InfiniAttention, x, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past=None,
                     inplace: bool = False):
    """InfiniAttention for one token. x: (B, 1, D); per-layer state slices; ``past`` (attend_previous): the
    layer's (keys, values) without RoPE, (B, H_kv, m, d). Returns (y, k_c, v_c, dM, dz)."""
    cfg = attn.config
    B = x.shape[0]
    q, k, v = attn.project(x)                                                       # (B, H, 1, d), (B, H_kv, 1, d)
    m = 0 if past is None else past[0].shape[2]
    at = positions(pos + m, 1)                                                      # (B, 1): after the past
    a_dot, k_cache, v_cache = cache_attention(attn.rotate(q, at), attn.rotate(k, at), v, pos, k_cache, v_cache,
                                              cfg.query_scale, rotated_past(attn, past, k.dtype), inplace)
    a, d_memory, d_norm = memory_decode_reference(q, k, v, a_dot, memory, norm, d_memory, d_norm, attn.beta,
                                                  cfg.update == "delta", cfg.eps)
    y = attn.o_proj(a.transpose(1, 2).reshape(B, 1, cfg.n_head * cfg.d_head))
    return y, k_cache, v_cache, d_memory, d_norm


def block_decode(block: Block, x, pos, *state, inplace: bool = False):
    h, *state = attention_decode(block.self_attn, block.input_layernorm(x), pos, *state,   # state (and past)
                                 inplace=inplace)
    return (block.feed_forward(x, h), *state)


def decode_step(model: InfiniTransformer, token, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past=None,
                inplace: bool = False):
    """The decode step, a pure function (see the module docstring); with ``inplace`` (torch, not traced) the
    token's keys and values are written into ``k_cache``/``v_cache`` themselves, which it returns.

    token, pos: (B,) int64, 0 <= pos < N;  memory (L, B, H_kv, d, d), norm (L, B, H_kv, d) f32: read only;
    k_cache, v_cache (L, B, H_kv, N, d), d_memory (L, B, H_kv, d, d), d_norm (L, B, H_kv, d): f32.
    ``past`` (attend_previous models, read only): (L, 2, B, H_kv, m, d) f32, the segment step's past for this
    segment (:meth:`InfiniTransformer.step`); the token sits at position m + pos.
    Returns (logits (B, V), k_cache_out, v_cache_out, d_memory_out, d_norm_out): new tensors.
    Inputs are not checked here (it is traced for export): runners check them.
    """
    x = model.embed(token[:, None])                                          # (B, 1, D)
    outs = []
    for i, layer in enumerate(model.layers):
        x, *state = block_decode(layer, x, pos, memory[i], norm[i], k_cache[i], v_cache[i], d_memory[i], d_norm[i],
                                 None if past is None else (past[i, 0], past[i, 1]), inplace=inplace)
        outs.append(state)
    logits = model.lm_head(model.norm(x))[:, 0]                              # (B, V)
    return (logits, *stacked(outs, k_cache, v_cache, inplace))


def stacked(outs: list, k_cache, v_cache, inplace: bool) -> tuple:
    """The layers' (k_cache, v_cache, d_memory, d_norm) as (L, ...) tensors; in place, the caches are already."""
    k_out, v_out, d_memory, d_norm = zip(*outs)
    caches = (k_cache, v_cache) if inplace else (torch.stack(k_out), torch.stack(v_out))
    return (*caches, torch.stack(d_memory), torch.stack(d_norm))


class DecodeStep(nn.Module):
    """``decode_step`` as a module's forward, for exporters that take an ``nn.Module``."""

    def __init__(self, model: InfiniTransformer):
        super().__init__()
        self.model = model

    def forward(self, token, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past=None):
        return decode_step(self.model, token, pos, memory, norm, k_cache, v_cache, d_memory, d_norm, past)


def initial_decode_state(config: InfiniConfig, batch: int = 1, device=None):
    """Zero (k_cache, v_cache, d_memory, d_norm), float32, per KV head: the start of every segment."""
    L, H, d, N = config.n_layer, config.kv_heads, config.d_head, config.segment_len
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)  # noqa: E731
    return zeros(L, batch, H, N, d), zeros(L, batch, H, N, d), zeros(L, batch, H, d, d), zeros(L, batch, H, d)


def fold(memory, norm, d_memory, d_norm):
    """The state after a segment filled by decoding: (M + dM, z + dz), new tensors."""
    return memory + d_memory, norm + d_norm
