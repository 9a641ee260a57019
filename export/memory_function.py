"""The memory block (retrieval, gate, update) as ONE custom-domain ONNX node.

The node is ``infini::Memory`` (linear rule, Eq 8) or ``infini::MemoryDelta``
(delta rule, Eq 9); its definition ships inside the file as an ONNX local
function of standard ops, so onnxruntime runs it with no custom-op library and
TensorRT can bind the same node to a plugin of that name::

    q, a_dot (B,H,n,d), k, v (B,Hkv,n,d)     memory (B,Hkv,d,d) f32   norm (B,Hkv,d) f32   beta (H,)
       |      |                                  |                      |
     Cast   Cast -> Elu+1 = sk --------------+---|----------------------|-----+
       |                                      |  |                      |     |
     Elu+1 = sq -Reshape(B,Hkv,G*n,d)-MatMul(memory)- Div -Reshape(B,H,n,d)-+  +- update: M + sk^T (v [- delta ...])
       |                        |                    |                      |
       +---------MatMul(norm)+eps-------------------+   gate: sigmoid(beta) mix with a_dot  +--- z + sum_n sk
                                                        |
                                                        a (act. dtype)  memory_out f32  norm_out f32

Grouped-query attention (Hkv < H): the G = H / Hkv query heads of a KV head are consecutive, so
(B, H, n, d) regroups as (B, Hkv, G*n, d) and every query head reads its KV head's memory with its
own sigma(Q) and its own beta (Hkv = H: the reshapes are identities).

Everything inside computes in float32, like ``models.memory.memory_reference``.
Intermediate names carry their stage (``retrieve_``, ``gate_``, ``update_``),
and :func:`name_function_nodes` turns them into node names such as
``retrieve/MatMul_a_mem``, so errors and profiles map back to Eqs 7-10.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
from onnxscript.onnx_types import FLOAT

DOMAIN = "infini"
DOMAIN_VERSION = 1
OP_LINEAR = "Memory"
OP_DELTA = "MemoryDelta"
STAGES = ("retrieve", "gate", "update")

infini = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


@onnxscript.script(infini, default_opset=op)
def Memory(q: TFloat, k: TFloat, v: TFloat, a_dot: TFloat, memory: FLOAT, norm: FLOAT, beta: TFloat,
           eps: float) -> tuple[TFloat, FLOAT, FLOAT]:
    retrieve_one = op.Constant(value_float=1.0)
    retrieve_eps = op.Constant(value_float=eps)
    retrieve_q32 = op.Cast(q, to=1)
    retrieve_elu_q = op.Elu(retrieve_q32)
    retrieve_sq = op.Add(retrieve_elu_q, retrieve_one)                 # sigma(Q) (B, H, n, d)
    retrieve_group_shape = op.Concat(op.Shape(memory, start=0, end=2), op.Constant(value_ints=[-1]),
                                     op.Shape(q, start=3), axis=0)      # [B, H_kv, -1, d]
    retrieve_sqg = op.Reshape(retrieve_sq, retrieve_group_shape)       # (B, H_kv, G*n, d): GQA groups
    retrieve_num = op.MatMul(retrieve_sqg, memory)                      # sigma(Q) M_prev
    retrieve_norm = op.Unsqueeze(norm, [-1])
    retrieve_dot = op.MatMul(retrieve_sqg, retrieve_norm)               # sigma(Q) z_prev
    retrieve_den = op.Add(retrieve_dot, retrieve_eps)
    retrieve_a_memg = op.Div(retrieve_num, retrieve_den)                # Eq 7
    retrieve_a_mem = op.Reshape(retrieve_a_memg, op.Shape(q))           # (B, H, n, d)
    gate_beta32 = op.Cast(beta, to=1)
    gate_sig = op.Sigmoid(gate_beta32)
    gate_g = op.Reshape(gate_sig, [1, -1, 1, 1])
    gate_mem = op.Mul(gate_g, retrieve_a_mem)
    gate_1mg = op.Sub(retrieve_one, gate_g)
    gate_a_dot32 = op.Cast(a_dot, to=1)
    gate_dot = op.Mul(gate_1mg, gate_a_dot32)
    gate_a32 = op.Add(gate_mem, gate_dot)                               # Eq 10
    gate_a = op.CastLike(gate_a32, a_dot)
    update_k32 = op.Cast(k, to=1)
    update_elu_k = op.Elu(update_k32)
    update_sk = op.Add(update_elu_k, retrieve_one)                      # sigma(K)
    update_skt = op.Transpose(update_sk, perm=[0, 1, 3, 2])
    update_v32 = op.Cast(v, to=1)
    update_dm = op.MatMul(update_skt, update_v32)
    update_memory = op.Add(memory, update_dm)                           # Eq 8
    update_sum = op.ReduceSum(update_sk, [-2], keepdims=0)
    update_norm = op.Add(norm, update_sum)
    return gate_a, update_memory, update_norm


@onnxscript.script(infini, default_opset=op)
def MemoryDelta(q: TFloat, k: TFloat, v: TFloat, a_dot: TFloat, memory: FLOAT, norm: FLOAT, beta: TFloat,
                eps: float) -> tuple[TFloat, FLOAT, FLOAT]:
    retrieve_one = op.Constant(value_float=1.0)
    retrieve_eps = op.Constant(value_float=eps)
    retrieve_q32 = op.Cast(q, to=1)
    retrieve_elu_q = op.Elu(retrieve_q32)
    retrieve_sq = op.Add(retrieve_elu_q, retrieve_one)
    retrieve_group_shape = op.Concat(op.Shape(memory, start=0, end=2), op.Constant(value_ints=[-1]),
                                     op.Shape(q, start=3), axis=0)
    retrieve_sqg = op.Reshape(retrieve_sq, retrieve_group_shape)
    retrieve_num = op.MatMul(retrieve_sqg, memory)
    retrieve_norm = op.Unsqueeze(norm, [-1])
    retrieve_dot = op.MatMul(retrieve_sqg, retrieve_norm)
    retrieve_den = op.Add(retrieve_dot, retrieve_eps)
    retrieve_a_memg = op.Div(retrieve_num, retrieve_den)
    retrieve_a_mem = op.Reshape(retrieve_a_memg, op.Shape(q))
    gate_beta32 = op.Cast(beta, to=1)
    gate_sig = op.Sigmoid(gate_beta32)
    gate_g = op.Reshape(gate_sig, [1, -1, 1, 1])
    gate_mem = op.Mul(gate_g, retrieve_a_mem)
    gate_1mg = op.Sub(retrieve_one, gate_g)
    gate_a_dot32 = op.Cast(a_dot, to=1)
    gate_dot = op.Mul(gate_1mg, gate_a_dot32)
    gate_a32 = op.Add(gate_mem, gate_dot)
    gate_a = op.CastLike(gate_a32, a_dot)
    update_k32 = op.Cast(k, to=1)
    update_elu_k = op.Elu(update_k32)
    update_sk = op.Add(update_elu_k, retrieve_one)
    update_num = op.MatMul(update_sk, memory)                           # Eq 9: what M already holds
    update_dot = op.MatMul(update_sk, retrieve_norm)
    update_den = op.Add(update_dot, retrieve_eps)
    update_known = op.Div(update_num, update_den)
    update_v32 = op.Cast(v, to=1)
    update_new = op.Sub(update_v32, update_known)
    update_skt = op.Transpose(update_sk, perm=[0, 1, 3, 2])
    update_dm = op.MatMul(update_skt, update_new)
    update_memory = op.Add(memory, update_dm)
    update_sum = op.ReduceSum(update_sk, [-2], keepdims=0)
    update_norm = op.Add(norm, update_sum)
    return gate_a, update_memory, update_norm


def translate_memory(q, k, v, a_dot, memory, norm, beta, delta: bool, eps: float):
    """custom_translation_table entry for ``torch.ops.infini.memory``: one node, linear or delta."""
    function = MemoryDelta if delta else Memory
    return function(q, k, v, a_dot, memory, norm, beta, eps=eps)


def is_memory_function(function: ir.Function) -> bool:
    return function.domain == DOMAIN and function.name in (OP_LINEAR, OP_DELTA)


def name_function_nodes(function: ir.Function) -> None:
    """Name body nodes ``<stage>/<OpType>_<what>`` from the stage prefix of their first output;
    helper constants (list literals such as axes) take the stage of their first consumer."""
    for node in function:
        value = node.outputs[0].name or ""
        stage, _, what = value.partition("_")
        if stage in STAGES:
            node.name = f"{stage}/{node.op_type}_{what}"
    for node in function:
        if node.name.split("/")[0] not in STAGES:
            users = [user for user, _ in node.outputs[0].uses()]
            stage = users[0].name.split("/")[0] if users else "retrieve"
            node.name = f"{stage}/{node.op_type}_{node.outputs[0].name}"
