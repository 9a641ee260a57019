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

from . import SUPPORTED_DIMS, interpreted
from .tiles import KernelConfig, default_config  # noqa: F401  (re-exported: ti.KernelConfig, ti.default_config)
from .triton_kernels import LOG2E, _attn_kernel, _memory_kernel, _update_kernel  # noqa: F401  (re-exported)

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
    if _split is not None:   # the two launches, for timing each on its own (tools/dev/gpu_check.py)
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
