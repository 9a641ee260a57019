"""Local causal attention for the exporter: the ONNX Attention op, or a decomposition.

Which one a precision gets is decided here (docs/onnx.md explains why):

- fp16, bf16: the standard ``Attention`` op (opset >= 23), which has fused kernels
  in onnxruntime and TensorRT. The dynamo exporter emits it by itself.
- fp32: a decomposition into MatMul / Softmax, because TensorRT rejects its
  attention layer in fp32 with small head sizes, and one fp32 graph must build
  everywhere::

      q --Mul(1/sqrt(d))--MatMul-- scores (B,H,n,n) --Where(row >= col, ., -inf)--Softmax--MatMul-- out
      k --Transpose(0,1,3,2)--+                                                             v --+

- ``fused=True`` (``infini export --fused``, fp32 and the int8/int4 graphs made from it): onnxruntime's
  contrib ``com.microsoft.GroupQueryAttention`` (its CPU kernel computes only the causal half and never
  writes the (B,H,n,n) mask), for onnxruntime only: TensorRT cannot parse contrib ops::

      q, k, v (B,H,n,d) --Transpose(0,2,1,3)+Reshape(B,n,H*d)-- GroupQueryAttention(seqlens_k = n-1) --
          Reshape(B,n,H,d)+Transpose(0,2,1,3)-- out
"""

from __future__ import annotations

import math

import torch
import onnx
import onnxscript
from onnxscript import opset18 as op

from ..models.manifest import FUSED_ATTENTION

USES_ATTENTION_OP = {"float32": False, "float16": True, "bfloat16": True}
CONTRIB = "com.microsoft"
FUSED = FUSED_ATTENTION    # the manifest's ``attention`` of a fused export


def _contrib_op(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
                attributes: dict[str, onnx.defs.OpSchema.AttrType]) -> onnxscript.values.Op:
    """An op of onnxruntime's contrib domain for the exporter, with just the schema it needs to bind the
    call (onnx's registry does not have the contrib ops). inputs: (name, type, optional)."""
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    schema = OpSchema(
        name, CONTRIB, 1,
        inputs=[P(n, t, param_option=OpSchema.FormalParameterOption.Optional if opt else
                  OpSchema.FormalParameterOption.Single) for n, t, opt in inputs],
        outputs=[P(n, t) for n, t in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(a, kind, "") for a, kind in attributes.items()])
    return onnxscript.values.Op(onnxscript.values.Opset(CONTRIB, 1), name, schema)


_INT, _FLOAT = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.FLOAT
GroupQueryAttention = _contrib_op(
    "GroupQueryAttention",
    [("query", "T", False), ("key", "T", False), ("value", "T", False), ("past_key", "T", True),
     ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False)],
    [("output", "T"), ("present_key", "T"), ("present_value", "T")],
    {"num_heads": _INT, "kv_num_heads": _INT, "scale": _FLOAT})


def causal_attention_decomposed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                scale=None, enable_gqa=False):
    """Translation of ``aten.scaled_dot_product_attention`` for fp32 graphs (causal, no mask only)."""
    if attn_mask is not None or not is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("only causal attention without a mask is exported (models/model.py)")
    d = query.shape[-1]
    s = op.Constant(value_float=scale if scale is not None else 1.0 / math.sqrt(d))
    scores = op.MatMul(op.Mul(query, s), op.Transpose(key, perm=[0, 1, 3, 2]))        # (B, H, n, n)
    n = op.Shape(scores, start=-1)                                                      # [n]
    pos = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))  # (n,)
    causal = op.GreaterOrEqual(op.Unsqueeze(pos, [-1]), op.Unsqueeze(pos, [0]))        # (n, n): row >= col
    masked = op.Where(causal, scores, op.CastLike(op.Constant(value_float=-math.inf), scores))
    return op.MatMul(op.Softmax(masked, axis=-1), value)


def causal_attention_contrib(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                             scale=None, enable_gqa=False):
    """Translation of ``aten.scaled_dot_product_attention`` into onnxruntime's GroupQueryAttention. k and v
    arrive repeated to H heads (models/model.py).

    Causal without a mask: a first prompt (no past) of n tokens. Under a mask: the segment step of an
    ``attend_previous`` model (layers.local_attention), n queries against m = len(k) - n past keys and their own
    under key j <= m + i, which is GroupQueryAttention's own rule for n new tokens after a past of m: the first m
    keys and values go in as its past (the mask itself is not read; it is that rule by construction). Its CPU
    kernel takes a past only at batch 1 when n > 1 (onnxruntime 1.32), so runtime/ort_runner.py runs such a
    graph one batch row at a time."""
    if is_causal == (attn_mask is not None) or dropout_p or enable_gqa:
        raise NotImplementedError("causal attention, or the attend_previous mask, only (models/layers.py)")
    heads, d = query.shape[1], query.shape[-1]
    packed = op.Constant(value_ints=[0, 0, -1])
    n = op.Shape(query, start=2, end=3)                                                # [n]
    total = op.Shape(key, start=2, end=3)                                              # [m + n]
    batch = op.Shape(query, start=0, end=1)                                            # [B]
    past_k = past_v = None
    if attn_mask is not None:                                                          # the first m keys: past
        m, axis = op.Sub(total, n), op.Constant(value_ints=[2])
        past_k, past_v = (op.Slice(t, op.Constant(value_ints=[0]), m, axis) for t in (key, value))
        key, value = (op.Slice(t, m, total, axis) for t in (key, value))
    q, k, v = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), packed) for t in (query, key, value))  # (B, n, H*d)
    seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=6)  # (B,) int32: m + n - 1
    out, _, _ = GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, op.Cast(op.Squeeze(total), to=6),
                                    num_heads=heads, kv_num_heads=heads,
                                    scale=scale if scale is not None else 1.0 / math.sqrt(d))
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, d])), perm=[0, 2, 1, 3])


def translations(precision_dtype: str, fused: bool = False) -> dict:
    """Extra custom_translation_table entries for a precision (``fused``: the contrib attention op)."""
    if fused:
        return {torch.ops.aten.scaled_dot_product_attention.default: causal_attention_contrib}
    if USES_ATTENTION_OP[precision_dtype]:
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default: causal_attention_decomposed}


def masked_attention_decomposed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                scale=None, enable_gqa=False):
    """Translation of ``aten.scaled_dot_product_attention`` for the decode graph, every precision:
    one query against the fixed-size cache under a boolean mask (slots <= pos). Its inputs are float32
    there (the cache is state), where TensorRT's attention layer is not usable (see above). The segment
    graph of an ``attend_previous`` model uses it too: n queries against the past's keys and their own,
    under the mask key j <= past_len + i (models/model.py)::

        q --Mul(1/sqrt(d))--MatMul-- scores (B,H,1,N) --Where(mask, ., -inf)--Softmax--MatMul-- out
        k_cache --Transpose--+                                             v_cache --+
    """
    if attn_mask is None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("the decode step exports attention under a boolean mask only (models/decode.py)")
    d = query.shape[-1]
    s = op.Constant(value_float=scale if scale is not None else 1.0 / math.sqrt(d))
    scores = op.MatMul(op.Mul(query, s), op.Transpose(key, perm=[0, 1, 3, 2]))        # (B, H, 1, N)
    masked = op.Where(attn_mask, scores, op.CastLike(op.Constant(value_float=-math.inf), scores))
    return op.MatMul(op.Softmax(masked, axis=-1), value)


def decode_translations() -> dict:
    """custom_translation_table entries for the decode graph (any precision)."""
    return {torch.ops.aten.scaled_dot_product_attention.default: masked_attention_decomposed}
