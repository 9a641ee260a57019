"""The Infini-attention memory block: retrieval, gate and update (paper Eqs 7-10).

This is the unit the ONNX export turns into one custom-domain node and the GPU
kernels replace, so it is a torch custom op (``infini::memory``) whose default
implementation is :func:`memory_reference`. Everything on the memory path runs
in float32 whatever the activation dtype: the sums in M and z grow without
bound, and half-precision state is a known cause of inf/NaN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}   # the half precisions the weights' matmuls may take


def autocast_context(name: str | None, device):
    """``torch.autocast`` of the weights' matmuls in ``name`` ("bf16", "fp16"); None or "off": as they are.
    The memory path stays float32 inside it (:func:`float32_path`)."""
    dtype = AUTOCAST.get(name)
    return torch.autocast(torch.device(device).type, dtype or torch.float32, enabled=dtype is not None)


def float32_path(fn):
    """Run ``fn`` with autocast off: under ``torch.autocast`` (bf16 on a CPU, fp16 on a GPU) the matmuls of
    the memory path would otherwise run in half precision, and M would be read and grown in it."""
    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        if torch.is_autocast_enabled(q.device.type):
            with torch.autocast(q.device.type, enabled=False):
                return fn(q, *args, **kwargs)
        return fn(q, *args, **kwargs)
    return wrapper


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1: a positive feature map, so z > 0 once a key has been seen."""
    return F.elu(x) + 1.0


def retrieve(sq, memory, norm, eps: float):
    """Eq 7 with grouped-query attention: every query head reads its KV head's memory.

    sq: sigma(Q) (B, H, n, d) f32; memory (B, H_kv, d, d), norm (B, H_kv, d) f32, H = G * H_kv.
    Query head h belongs to KV head h // G (Llama's repeat_kv order), so the G heads of a group
    are consecutive and (B, H, n, d) regroups as (B, H_kv, G * n, d) without moving data.
    Returns A_mem (B, H, n, d) f32.
    """
    B, H, n, d = sq.shape
    grouped = sq.reshape(B, memory.shape[1], -1, d)                      # (B, H_kv, G*n, d)
    a_mem = (grouped @ memory) / (grouped @ norm.unsqueeze(-1) + eps)    # eps: M = z = 0 at segment 1
    return a_mem.reshape(B, H, n, d)


@float32_path
def memory_reference(q, k, v, a_dot, memory, norm, beta, delta: bool, eps: float):
    """One layer's memory block over a segment.

    q, a_dot: (B, H, n, d); k, v: (B, H_kv, n, d), activation dtype; q and k *without* RoPE.
    memory: (B, H_kv, d, d) float32 = M_prev.   norm: (B, H_kv, d) float32 = z_prev.
    beta: (H,) gate logits, one per query head.  delta: the Eq 9 rule instead of Eq 8.
    H_kv = H without grouped-query attention; otherwise H_kv divides H (see :func:`retrieve`).
    Returns (a, memory_out, norm_out): a in the activation dtype, state in float32.
    Retrieval reads M_prev; the update follows it.
    """
    sq, sk = sigma(q.float()), sigma(k.float())                          # (B, H, n, d), (B, H_kv, n, d)
    a_mem = retrieve(sq, memory, norm, eps)                              # Eq 7
    g = torch.sigmoid(beta.float()).view(1, -1, 1, 1)                    # (1, H, 1, 1)
    a = g * a_mem + (1.0 - g) * a_dot.float()                            # Eq 10
    v_new = v.float()
    if delta:                                                            # Eq 9: store only what M lacks
        v_new = v_new - (sk @ memory) / (sk @ norm.unsqueeze(-1) + eps)
    memory_out = memory + sk.transpose(-1, -2) @ v_new                   # (B, H_kv, d, d)
    norm_out = norm + sk.sum(dim=-2)                                     # (B, H_kv, d)
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
    # contiguous, as op_outputs makes the real ones (empty_like would copy a_dot's transposed strides)
    return a_dot.new_empty(a_dot.shape), memory.new_empty(memory.shape), norm.new_empty(norm.shape)


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
