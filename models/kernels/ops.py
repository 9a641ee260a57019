"""Torch custom ops backed by the Triton kernels, with the reference as their fallback.

``infini::attention(q, k, v, memory, norm, beta, delta, eps, rope_theta)`` is one layer's
whole Infini-attention (RoPE + causal SDPA + the memory block). Its default (CPU) body
is the reference; on CUDA it runs ``triton_infini.fused_attention`` when triton is
there and the head size is supported, else the reference. InfiniAttention uses it on
CUDA only: the CPU path and the ONNX export keep SDPA + ``infini::memory``.

``infini::memory`` (models/memory.py) gets a CUDA kernel here too: the one-kernel
memory block that the TensorRT plugin wraps.

Both are opaque to torch.compile and capturable in CUDA graphs (no host syncs).
Autograd: the vjp of the reference, as for infini::memory.
"""

from __future__ import annotations

import torch

from . import enabled, supports
from ..layers import local_attention, rope
from ..memory import memory_op, memory_reference, op_outputs


def attention_reference(q, k, v, memory, norm, beta, delta: bool, eps: float, rope_theta: float):
    """RoPE (segment-local positions) + causal SDPA + memory_reference; q (B, H, n, d), k, v (B, H_kv, n, d),
    without RoPE."""
    a_dot = local_attention(rope(q, rope_theta), rope(k, rope_theta), v)
    return memory_reference(q, k, v, a_dot, memory, norm, beta, delta, eps)


def use_kernel(q: torch.Tensor) -> bool:
    """The Triton kernel runs for CUDA tensors of a supported head size unless INFINI_TRITON=0."""
    return q.is_cuda and supports(q.shape[-1]) and enabled()


@torch.library.custom_op("infini::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: torch.Tensor,
                 norm: torch.Tensor, beta: torch.Tensor, delta: bool, eps: float,
                 rope_theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's Infini-attention as one op (see :func:`attention_reference`)."""
    return op_outputs(attention_reference(q, k, v, memory, norm, beta, delta, eps, rope_theta))


@attention_op.register_kernel("cuda")
def _(q, k, v, memory, norm, beta, delta, eps, rope_theta):
    if use_kernel(q):
        from .triton_infini import fused_attention
        return fused_attention(q, k, v, memory, norm, beta, delta, eps, rope_theta)
    return op_outputs(attention_reference(q, k, v, memory, norm, beta, delta, eps, rope_theta))


@attention_op.register_fake
def _(q, k, v, memory, norm, beta, delta, eps, rope_theta):
    return q.new_empty(q.shape), memory.new_empty(memory.shape), norm.new_empty(norm.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.delta, ctx.eps, ctx.rope_theta = inputs[6], inputs[7], inputs[8]


def _backward(ctx, grad_a, grad_memory, grad_norm):
    inputs = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda *t: attention_reference(*t, ctx.delta, ctx.eps, ctx.rope_theta), *inputs)
    return (*vjp((grad_a, grad_memory, grad_norm)), None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)


@memory_op.register_kernel("cuda")
def _(q, k, v, a_dot, memory, norm, beta, delta, eps):
    if use_kernel(q):
        from .triton_infini import fused_memory
        return fused_memory(q, k, v, a_dot, memory, norm, beta, delta, eps)
    return op_outputs(memory_reference(q, k, v, a_dot, memory, norm, beta, delta, eps))
