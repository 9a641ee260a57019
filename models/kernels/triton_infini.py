"""Triton kernels for one layer's Infini-attention segment step, and their torch launchers.

Two entry points, both the same function as the reference (models/memory.py):

  fused_attention(q, k, v, memory, norm, beta, delta, eps, rope_theta)
      RoPE + causal local attention + retrieval + gate + update, in two kernels:

        q, k, v (B,H,n,d)           M_prev, z_prev (f32)
          |  k, v                      |
          v                            v
      [_update_kernel]  grid (S, B*H_kv): q_rope, k_rope = RoPE(q), RoPE(k); partial dM_s = sk^T v'
          |  q_rope, k_rope,   and dz_s over one token chunk each (v' = v, or v - retrieval for delta)
          |                    (the GROUP = H / H_kv query heads of a KV head are RoPE'd by its program)
          v  partials
      [_attn_kernel]    grid (B*H, n/BLOCK_M), query blocks last-first: flash attention of q_rope
                        over k_rope, v (online softmax, f32), retrieval sigma(q) M_prev /
                        (sigma(q) z_prev + eps) in chunks of RET_K rows of M_prev, gate mix -> a;
                        and each program also sums a slice of the partials:
                        M_out = M_prev + sum_s dM_s, z_out = z_prev + sum_s dz_s

  fused_memory(q, k, v, a_dot, memory, norm, beta, delta, eps)
      the memory block alone (a_dot given), one kernel `_memory_kernel`, grid (B*H, d/BLOCK_C) (memory_launch):
      the CUDA kernel of ``infini::memory`` and of the TensorRT plugin (export/trt_plugin.py).

Precision: activations fp16/bf16/fp32; softmax, retrieval and the state in float32. The
matmuls against the state (sigma(q) M, sigma(k) M, sigma(k)^T v) take float32 operands at
``MEM_PRECISION`` ("tf32" on GPUs by default: 10-bit mantissa products, f32 accumulation;
"ieee" for exact f32). Attention matmuls run in the activation dtype with f32 accumulation.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import SUPPORTED_DIMS, interpreted
from .tiles import KernelConfig, default_config  # noqa: F401  (re-exported: ti.KernelConfig, ti.default_config)

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _sigma(x):
    """ELU + 1 in f32: x + 1 for x > 0, exp(x) otherwise."""
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _rope_store(src, dst, offs_t, mask_t, stride_t, COS, SIN, D: tl.constexpr):
    """dst[t, :] = RoPE(src[t, :]) for the tile of positions offs_t (rotate-half layout), f32 math.

    Works on the two halves x1 = x[:, :D/2], x2 = x[:, D/2:]: out1 = x1 cos - x2 sin,
    out2 = x2 cos + x1 sin, the reference's x cos + rotate_half(x) sin term by term. COS/SIN
    are (n, D/2) f32 (the reference's angles repeat across the halves), so a tile reads half
    the table bytes and holds 4 half tiles, not 4 full ones. dst is contiguous (n, D).
    """
    offs_h = tl.arange(0, D // 2)
    m2 = mask_t[:, None]
    x1 = tl.load(src + offs_t[:, None] * stride_t + offs_h[None, :], mask=m2, other=0.0)
    x2 = tl.load(src + offs_t[:, None] * stride_t + (offs_h + D // 2)[None, :], mask=m2, other=0.0)
    cos = tl.load(COS + offs_t[:, None] * (D // 2) + offs_h[None, :], mask=m2, other=1.0)
    sin = tl.load(SIN + offs_t[:, None] * (D // 2) + offs_h[None, :], mask=m2, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out = dst + offs_t[:, None] * D + offs_h[None, :]
    tl.store(out, (x1f * cos + (-x2f) * sin).to(x1.dtype), mask=m2)
    tl.store(out + D // 2, (x2f * cos + x1f * sin).to(x1.dtype), mask=m2)


# --------------------------------------------------------------------------------------------
# Kernel 1 of the fused step: RoPE(k) and the partial memory updates
# --------------------------------------------------------------------------------------------
@triton.jit
def _update_kernel(Q, K, V, M, Z, COS, SIN, QR, KR, PM, PZ,
                   s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                   H_KV, n_ctx, tiles_per_prog, eps,
                   D: tl.constexpr, BLOCK_T: tl.constexpr, DELTA: tl.constexpr, ROPE: tl.constexpr,
                   MEM_PRECISION: tl.constexpr, GROUP: tl.constexpr):
    # grid (S, B*H_kv): one program per token chunk and (batch, KV head); the KV head's GROUP query
    # heads (GROUP = H / H_kv, 1 without grouped-query attention) get their RoPE here too.
    pid_s = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // H_KV
    j = bkv % H_KV
    offs_d = tl.arange(0, D)
    k_base = K + b * s_kb + j * s_kh
    v_base = V + b * s_vb + j * s_vh
    acc = tl.zeros((D, D), dtype=tl.float32)   # sum_t sk_t^T v'_t over this program's tokens
    zacc = tl.zeros((D,), dtype=tl.float32)
    if DELTA:
        m_prev = tl.load(M + bkv * D * D + offs_d[:, None] * D + offs_d[None, :])
        z_prev = tl.load(Z + bkv * D + offs_d)
    for i in range(0, tiles_per_prog):
        offs_t = (pid_s * tiles_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_ctx
        if ROPE:   # RoPE(q), RoPE(k) once per token, for the attention kernel
            for g in tl.static_range(GROUP):   # query head j * GROUP + g of (B, H, n, d)
                _rope_store(Q + b * s_qb + (j * GROUP + g) * s_qh, QR + (bkv * GROUP + g) * n_ctx * D,
                            offs_t, mask_t, s_qt, COS, SIN, D)
            _rope_store(k_base, KR + bkv * n_ctx * D, offs_t, mask_t, s_kt, COS, SIN, D)
        k = tl.load(k_base + offs_t[:, None] * s_kt + offs_d[None, :], mask=mask_t[:, None], other=0.0)
        v = tl.load(v_base + offs_t[:, None] * s_vt + offs_d[None, :], mask=mask_t[:, None], other=0.0)
        sk = tl.where(mask_t[:, None], _sigma(k.to(tl.float32)), 0.0)   # padded rows add nothing
        vn = v.to(tl.float32)
        if DELTA:   # Eq 9: store only what M_prev does not already return for this key
            ret = tl.dot(sk, m_prev, input_precision=MEM_PRECISION)
            den = tl.sum(sk * z_prev[None, :], axis=1) + eps
            vn = vn - ret / den[:, None]
        acc += tl.dot(tl.trans(sk), vn, input_precision=MEM_PRECISION)
        zacc += tl.sum(sk, axis=0)
    part = pid_s * tl.num_programs(1) + bkv
    tl.store(PM + part * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
    tl.store(PZ + part * D + offs_d, zacc)


# --------------------------------------------------------------------------------------------
# Kernel 2 of the fused step: flash attention + retrieval + gate, and the partials' sum
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_inner(acc, l_i, m_i, q, KR, V, s_vt, offs_m, offs_d, lo, hi, n_ctx, qk_scale,
                D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, ATT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:   # the diagonal blocks: causal mask, and keys past n_ctx
            mask_n = offs_n < n_ctx
            k = tl.load(KR + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * s_vt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        else:
            k = tl.load(KR + offs_n[:, None] * D + offs_d[None, :])
            v = tl.load(V + offs_n[:, None] * s_vt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=ATT_PRECISION)   # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < n_ctx)
            qk = tl.where(keep, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)   # log2 units
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])        # one FMA per score
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=ATT_PRECISION)   # into acc: no second tile
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_kernel(Q, QR, KR, V, M, Z, BETA, A, PM, PZ, MO, ZO,
                 s_qb, s_qh, s_qt, s_rb, s_rh, s_rt, s_vb, s_vh, s_vt,
                 H, n_ctx, n_parts, eps, qk_scale,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_R: tl.constexpr,
                 RET_K: tl.constexpr, ATT_PRECISION: tl.constexpr, MEM_PRECISION: tl.constexpr,
                 GROUP: tl.constexpr):
    # grid (B*H, n/BLOCK_M): the heads vary fastest and the query blocks run last-first, so
    # the longest causal rows of every head start in the first wave (longest job first).
    # Query head h reads KV head h // GROUP: its keys, values and memory (bkv below).
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = bh // H
    h = bh % H
    bkv = b * (H // GROUP) + h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < n_ctx
    # RoPE(q) as kernel 1 stored it (or q itself without RoPE)
    qr = tl.load(QR + b * s_rb + h * s_rh + offs_m[:, None] * s_rt + offs_d[None, :], mask=mask_m[:, None],
                 other=0.0)
    kr_base = KR + bkv * n_ctx * D
    v_base = V + b * s_vb + (h // GROUP) * s_vh
    # -- local causal attention, online softmax (base 2) --------------------------------------
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    diag = start_m * BLOCK_M   # blocks before the diagonal need no mask
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, qr, kr_base, v_base, s_vt, offs_m, offs_d, 0, diag, n_ctx,
                                qk_scale, D, BLOCK_N, False, ATT_PRECISION)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, qr, kr_base, v_base, s_vt, offs_m, offs_d, diag,
                                tl.minimum(diag + BLOCK_M, n_ctx), n_ctx, qk_scale, D, BLOCK_N, True,
                                ATT_PRECISION)
    g = 1.0 / (1.0 + tl.exp(-tl.load(BETA + h).to(tl.float32)))
    a = acc * ((1.0 - g) / l_i)[:, None]   # (1 - g) a_dot
    # -- retrieval from M_prev (Eq 7) and the gate (Eq 10), accumulated into a in chunks of
    # RET_K rows of M_prev: g sigma(q) M_prev / (sigma(q) z_prev + eps). q (without RoPE) is
    # read again here (L2), not kept through the loop; a whole-tile sigma(q) next to a, and a
    # second (BLOCK_M, D) f32 result, would spill registers.
    q_base = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c in range(0, D, RET_K):
        offs_c = c + tl.arange(0, RET_K)
        sq = _sigma(tl.load(q_base + offs_c[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32))
        den += tl.sum(sq * tl.load(Z + bkv * D + offs_c)[None, :], axis=1)
    w = g / (den + eps)
    for c in range(0, D, RET_K):
        offs_c = c + tl.arange(0, RET_K)
        sq = _sigma(tl.load(q_base + offs_c[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32))
        m_rows = tl.load(M + bkv * D * D + offs_c[:, None] * D + offs_d[None, :])   # (RET_K, D)
        a = tl.dot(sq * w[:, None], m_rows, acc=a, input_precision=MEM_PRECISION)
    z_prev = tl.load(Z + bkv * D + offs_d)
    tl.store(A + bh * n_ctx * D + offs_m[:, None] * D + offs_d[None, :], a.to(qr.dtype), mask=mask_m[:, None])
    # -- this program's slice of M_out = M_prev + sum of the partials (kernel 1 has finished); with
    # grouped-query attention only the group's first query head writes its KV head's state ------
    if h % GROUP == 0:
        n_bkv = tl.num_programs(0) // GROUP
        offs_r = tl.arange(0, ROWS_R)
        for r0 in range(start_m * ROWS_R, D, tl.num_programs(1) * ROWS_R):
            rows = (r0 + offs_r)[:, None] * D + offs_d[None, :]
            tile = tl.load(M + bkv * D * D + rows)
            for s in range(0, n_parts):
                tile += tl.load(PM + (s * n_bkv + bkv) * D * D + rows)
            tl.store(MO + bkv * D * D + rows, tile)
        if start_m == 0:
            zt = z_prev
            for s in range(0, n_parts):
                zt += tl.load(PZ + (s * n_bkv + bkv) * D + offs_d)
            tl.store(ZO + bkv * D + offs_d, zt)


# --------------------------------------------------------------------------------------------
# The memory block alone (a_dot given): one kernel, contiguous (B, H, n, D) inputs.
# Argument order (inputs, scalars, outputs, constexprs) is the TensorRT AOT plugin's.
# --------------------------------------------------------------------------------------------
@triton.jit
def _memory_kernel(Q, K, V, ADOT, M, Z, BETA, n_ctx, H, A, MO, ZO,
                   EPS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                   DELTA: tl.constexpr, MEM_PRECISION: tl.constexpr, GROUP: tl.constexpr):
    # grid (B*H, D/BLOCK_C): q, a_dot, A are (B, H, n, D); k, v (B, H_kv, n, D) and the state per KV head,
    # H = GROUP * H_kv. Every program retrieves for its query head; the group's first also updates.
    bh = tl.program_id(0)
    c = tl.program_id(1)       # this program's block of value columns
    h = bh % H
    bkv = (bh // H) * (H // GROUP) + h // GROUP
    offs_d = tl.arange(0, D)
    offs_c = c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_prev = tl.load(M + bkv * D * D + offs_d[:, None] * D + offs_c[None, :])   # (D, BLOCK_C)
    z_prev = tl.load(Z + bkv * D + offs_d)
    g = 1.0 / (1.0 + tl.exp(-tl.load(BETA + h).to(tl.float32)))
    base = bh * n_ctx * D
    for t0 in range(0, n_ctx, BLOCK_T):   # retrieval (Eq 7) and the gate (Eq 10)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_ctx
        q = tl.load(Q + base + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None], other=0.0)
        sq = _sigma(q.to(tl.float32))
        a_mem = tl.dot(sq, m_prev, input_precision=MEM_PRECISION) / (tl.sum(sq * z_prev[None, :], axis=1) + EPS)[:, None]
        cols = base + offs_t[:, None] * D + offs_c[None, :]
        a_dot = tl.load(ADOT + cols, mask=mask_t[:, None], other=0.0)
        tl.store(A + cols, (g * a_mem + (1.0 - g) * a_dot.to(tl.float32)).to(a_dot.dtype), mask=mask_t[:, None])
    if h % GROUP == 0:   # the update (Eq 8 / 9), once per KV head
        acc = tl.zeros((D, BLOCK_C), dtype=tl.float32)
        zacc = tl.zeros((D,), dtype=tl.float32)
        kv_base = bkv * n_ctx * D
        for t0 in range(0, n_ctx, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < n_ctx
            k = tl.load(K + kv_base + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None], other=0.0)
            sk = tl.where(mask_t[:, None], _sigma(k.to(tl.float32)), 0.0)
            vn = tl.load(V + kv_base + offs_t[:, None] * D + offs_c[None, :], mask=mask_t[:, None],
                         other=0.0).to(tl.float32)
            if DELTA:
                vn = vn - tl.dot(sk, m_prev, input_precision=MEM_PRECISION) / (tl.sum(sk * z_prev[None, :], axis=1) + EPS)[:, None]
            acc += tl.dot(tl.trans(sk), vn, input_precision=MEM_PRECISION)
            zacc += tl.sum(sk, axis=0)
        tl.store(MO + bkv * D * D + offs_d[:, None] * D + offs_c[None, :], m_prev + acc)
        tl.store(ZO + bkv * D + offs_d, z_prev + zacc, mask=offs_d + c * D < D)   # one program per head writes z


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_TABLES: dict = {}


def rope_tables(n: int, d: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, d/2) f32: the angles of models.model.rope, computed the same way, cached.

    The reference concatenates the d/2 angles with themselves; the kernels read one half.
    Warm up before CUDA-graph capture: a table first built inside a capture would hold
    numbers the graph computes but the eager cache never sees.
    """
    key = (n, d, float(theta), str(device))
    if key not in _TABLES:
        inv_freq = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq
        _TABLES[key] = (angles.cos().contiguous(), angles.sin().contiguous())
    return _TABLES[key]


def _check(q, k, v, memory, norm, beta) -> int:
    """The group size G = H / H_kv after checking the shapes: q (B, H, n, d), k, v (B, H_kv, n, d), state per KV head."""
    B, H, n, d = q.shape
    H_kv = k.shape[1]
    if d not in SUPPORTED_DIMS:
        raise ValueError(f"d_head {d} is not supported by the Triton kernels; supported: {SUPPORTED_DIMS}")
    if k.shape != (B, H_kv, n, d) or v.shape != k.shape or H % H_kv:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)}, {tuple(v.shape)} do not match: k and v "
                         "must have one shape, with a number of heads that divides q's")
    if memory.shape != (B, H_kv, d, d) or norm.shape != (B, H_kv, d) or beta.shape != (H,):
        raise ValueError(f"state shapes {tuple(memory.shape)}, {tuple(norm.shape)}, {tuple(beta.shape)} do not "
                         f"match q {tuple(q.shape)}")
    if memory.dtype != torch.float32 or norm.dtype != torch.float32:
        raise ValueError("memory and norm must be float32")
    return H // H_kv


def _precisions(dtype, cfg: KernelConfig) -> tuple[str, str]:
    mem = cfg.mem_precision or ("ieee" if dtype == torch.float32 else "tf32")
    att = "ieee" if dtype == torch.float32 and mem == "ieee" else "tf32"
    return att, mem


def _inner(x):   # last dim contiguous, any other strides (the model's transposed views pass as they are)
    return x if x.stride(-1) == 1 else x.contiguous()


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_attention(q, k, v, memory, norm, beta, delta: bool, eps: float, rope_theta: float | None,
                    config: KernelConfig | None = None, _split: dict | None = None):
    """The whole segment step of one layer: RoPE, causal local attention, retrieval, gate, update.

    q: (B, H, n, d), k, v: (B, H_kv, n, d) fp16/bf16/fp32, *without* RoPE (rope_theta=None: no RoPE at
    all); H_kv divides H (grouped-query attention: query head h reads KV head h // (H / H_kv));
    memory (B, H_kv, d, d) f32; norm (B, H_kv, d) f32; beta (H,). Returns (a (B, H, n, d) in q's
    dtype, memory_out, norm_out) as new tensors; the same numbers as
    ``memory_reference(q, k, v, sdpa(rope(q), rope(k), v, is_causal=True), ...)``.
    No host synchronisation: safe inside CUDA-graph capture once warmed up.
    ``_split`` (a dict; profiling only): launch nothing, put the two launches there as
    callables "update" and "attn" (run in that order) over the returned, still empty, outputs.
    """
    group = _check(q, k, v, memory, norm, beta)
    B, H, n, d = q.shape
    H_kv = H // group
    cfg = config or default_config(d, q.dtype)
    if cfg.block_m % cfg.block_n:
        raise ValueError(f"block_n {cfg.block_n} must divide block_m {cfg.block_m}")
    att_prec, mem_prec = _precisions(q.dtype, cfg)
    q, k, v = _inner(q), _inner(k), _inner(v)
    memory, norm, beta = memory.contiguous(), norm.contiguous(), beta.contiguous()
    rope = rope_theta is not None
    cos, sin = rope_tables(n, d, rope_theta, q.device) if rope else (memory, memory)  # unused when no RoPE
    # RoPE(q), RoPE(k) written by kernel 1 as contiguous (B, H, n, d); without RoPE, q is read in place
    qr = torch.empty((B, H, n, d), device=q.device, dtype=q.dtype) if rope else q
    kr = torch.empty((B, H_kv, n, d), device=q.device, dtype=q.dtype) if rope else k.contiguous()
    tiles = triton.cdiv(n, cfg.block_t)
    parts = cfg.parts or max(1, _num_sms(q.device) // (B * H_kv))
    tiles_per_prog = triton.cdiv(tiles, min(parts, tiles))
    parts = triton.cdiv(tiles, tiles_per_prog)
    pm = torch.empty((parts, B * H_kv, d, d), device=q.device, dtype=torch.float32)
    pz = torch.empty((parts, B * H_kv, d), device=q.device, dtype=torch.float32)
    a = torch.empty((B, H, n, d), device=q.device, dtype=q.dtype)
    memory_out = torch.empty_like(memory)
    norm_out = torch.empty_like(norm)
    update = functools.partial(
        _update_kernel[(parts, B * H_kv)],
        q, k, v, memory, norm, cos, sin, qr, kr, pm, pz,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H_kv, n, tiles_per_prog, eps,
        D=d, BLOCK_T=cfg.block_t, DELTA=bool(delta), ROPE=rope, MEM_PRECISION=mem_prec, GROUP=group,
        num_warps=cfg.update_warps, num_stages=cfg.update_stages)
    attn = functools.partial(
        _attn_kernel[(B * H, triton.cdiv(n, cfg.block_m))],
        q, qr, kr, v, memory, norm, beta, a, pm, pz, memory_out, norm_out,
        q.stride(0), q.stride(1), q.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H, n, parts, eps, LOG2E / math.sqrt(d),
        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ROWS_R=min(16, d),
        RET_K=min(cfg.ret_k, d), ATT_PRECISION=att_prec, MEM_PRECISION=mem_prec, GROUP=group,
        num_warps=cfg.attn_warps, num_stages=cfg.attn_stages)
    if _split is not None:   # the two launches, for timing each on its own (tools/gpu_check.py)
        _split["update"], _split["attn"] = update, attn
        return a, memory_out, norm_out
    update()
    attn()
    return a, memory_out, norm_out


def fused_memory(q, k, v, a_dot, memory, norm, beta, delta: bool, eps: float,
                 config: KernelConfig | None = None):
    """The memory block alone (retrieval, gate, update) given a_dot; see memory_reference.

    The TensorRT plugin's kernel. Inputs are made contiguous: q, a_dot (B, H, n, d), k, v (B, H_kv, n, d).
    """
    group = _check(q, k, v, memory, norm, beta)
    B, H, n, d = q.shape
    cfg = config or default_config(d, q.dtype)
    _, mem_prec = _precisions(q.dtype, cfg)
    q, k, v, a_dot = (t.contiguous() for t in (q, k, v, a_dot))
    memory, norm, beta = memory.contiguous(), norm.contiguous(), beta.contiguous()
    a = torch.empty_like(a_dot)
    memory_out, norm_out = torch.empty_like(memory), torch.empty_like(norm)
    block_t, block_c, warps = memory_launch(d)
    _memory_kernel[(B * H, d // block_c)](
        q, k, v, a_dot, memory, norm, beta, n, H, a, memory_out, norm_out,
        EPS=float(eps), D=d, BLOCK_T=min(cfg.block_t, block_t), BLOCK_C=block_c, DELTA=bool(delta),
        MEM_PRECISION=mem_prec, GROUP=group, num_warps=warps)
    return a, memory_out, norm_out


def memory_block_c(d: int) -> int:
    """Value columns per program of _memory_kernel (the plugin computes its grid with it).

    d = 128: 16 columns, so a (batch, head) gets 8 programs (the anchor's 16 heads fill 128
    of an H100/H200's 132 SMs; 2 programs per head, as with 64 columns, left 100 idle) and
    the d x 16 state slice stays in registers without spilling (ptxas, sm_90).
    """
    if interpreted():
        return min(d, 16)
    return 16 if d >= 128 else min(d, 64)


def memory_launch(d: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps) of _memory_kernel for head size d; grid (B*H, d / BLOCK_C)."""
    return 64, memory_block_c(d), (8 if d >= 128 and not interpreted() else 4)
