"""The @triton.jit kernels of the Infini-attention segment step (launched by triton_infini.py).

  _update_kernel   RoPE of q, k and the partial memory updates dM_s, dz_s over token chunks
  _attn_kernel     flash attention over the RoPE'd q, k + retrieval + gate, and the sum of the partials
  _memory_kernel   the memory block alone (a_dot given): the CUDA kernel of ``infini::memory``

triton_infini.py's docstring draws the data flow and states the precisions.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
