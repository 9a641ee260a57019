"""The Infini-attention memory block: retrieval, gate and update (paper Eqs 7-10).

This is the unit the ONNX export turns into one custom-domain node and the GPU
kernels replace, so it is a torch custom op (``infini::memory``) whose default
implementation is :func:`memory_reference`. Everything on the memory path runs
in float32 whatever the activation dtype: the sums in M and z grow without
bound, and half-precision state is a known cause of inf/NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1: a positive feature map, so z > 0 once a key has been seen."""
    return F.elu(x) + 1.0


def memory_reference(q, k, v, a_dot, memory, norm, beta, delta: bool, eps: float):
    """One layer's memory block over a segment.

    q, k, v, a_dot: (B, H, n, d), activation dtype; q and k *without* RoPE.
    memory: (B, H, d, d) float32 = M_prev.   norm: (B, H, d) float32 = z_prev.
    beta: (H,) gate logits.  delta: the Eq 9 rule instead of Eq 8.
    Returns (a, memory_out, norm_out): a in the activation dtype, state in float32.
    Retrieval reads M_prev; the update follows it.
    """
    sq, sk = sigma(q.float()), sigma(k.float())                          # (B, H, n, d)
    a_mem = (sq @ memory) / (sq @ norm.unsqueeze(-1) + eps)              # Eq 7; eps: M = z = 0 at segment 1
    g = torch.sigmoid(beta.float()).view(1, -1, 1, 1)                    # (1, H, 1, 1)
    a = g * a_mem + (1.0 - g) * a_dot.float()                            # Eq 10
    v_new = v.float()
    if delta:                                                            # Eq 9: store only what M lacks
        v_new = v_new - (sk @ memory) / (sk @ norm.unsqueeze(-1) + eps)
    memory_out = memory + sk.transpose(-1, -2) @ v_new                   # (B, H, d, d)
    norm_out = norm + sk.sum(dim=-2)                                     # (B, H, d)
    return a.to(a_dot.dtype), memory_out, norm_out


def op_outputs(outputs):
    """Custom ops may not return views or their inputs: the references never do, but be explicit."""
    return tuple(t.contiguous() for t in outputs)


@torch.library.custom_op("infini::memory", mutates_args=())
def memory_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a_dot: torch.Tensor,
              memory: torch.Tensor, norm: torch.Tensor, beta: torch.Tensor,
              delta: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory block as one opaque op (see :func:`memory_reference`)."""
    return op_outputs(memory_reference(q, k, v, a_dot, memory, norm, beta, delta, eps))


@memory_op.register_fake
def _(q, k, v, a_dot, memory, norm, beta, delta, eps):
    return torch.empty_like(a_dot), torch.empty_like(memory), torch.empty_like(norm)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.delta, ctx.eps = inputs[7], inputs[8]


def _backward(ctx, grad_a, grad_memory, grad_norm):
    # Recompute the reference and take its vector-Jacobian product: the op stays
    # differentiable (training backpropagates through the memory) with one formula.
    inputs = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda *t: memory_reference(*t, ctx.delta, ctx.eps), *inputs)
    return (*vjp((grad_a, grad_memory, grad_norm)), None, None)


memory_op.register_autograd(_backward, setup_context=_setup_context)
