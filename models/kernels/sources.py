"""Ahead-of-time sources of the fused step's kernels (no GPU needed): what `fused_attention`
compiles, with the same constexprs, for sm_90 compile checks (tools/dev/kernel_stats.py, tests)."""

from __future__ import annotations

import torch
import triton

from .tiles import KernelConfig, default_config
from .triton_infini import _attn_kernel, _precisions, _update_kernel

_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, act: str, f32_ptrs: set, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("eps", "qk_scale"):
            sig[name] = "fp32"
        elif name.isupper() and name not in ("H", "D"):   # tensors are the upper-case arguments
            sig[name] = "*fp32" if name in f32_ptrs else f"*{act}"
        else:
            sig[name] = "i32"
    return sig


def fused_step_sources(d: int, dtype: torch.dtype, delta: bool, rope: bool = True,
                       config: KernelConfig | None = None) -> dict:
    """{"update" | "attn": (ASTSource, num_warps, num_stages)}: the fused step's two kernels with
    the constexprs `fused_attention` gives them (its default tiles unless `config`), for
    ``triton.compile(src, target=GPUTarget("cuda", 90, 32), options=...)`` on any machine."""
    cfg = config or default_config(d, dtype)
    att_prec, mem_prec = _precisions(dtype, cfg)
    act = _TT[dtype]
    up = dict(D=d, BLOCK_T=cfg.block_t, DELTA=bool(delta), ROPE=bool(rope), MEM_PRECISION=mem_prec)
    at = dict(D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ROWS_R=min(16, d), RET_K=min(cfg.ret_k, d),
              ATT_PRECISION=att_prec, MEM_PRECISION=mem_prec)
    src = triton.compiler.ASTSource
    return {
        "update": (src(fn=_update_kernel, constexprs=up,
                       signature=_signature(_update_kernel, act, {"M", "Z", "COS", "SIN", "PM", "PZ"}, up)),
                   cfg.update_warps, cfg.update_stages),
        "attn": (src(fn=_attn_kernel, constexprs=at,
                     signature=_signature(_attn_kernel, act, {"M", "Z", "BETA", "PM", "PZ", "MO", "ZO"}, at)),
                 cfg.attn_warps, cfg.attn_stages),
    }
