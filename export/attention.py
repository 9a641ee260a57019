"""Local causal attention for the exporter: the ONNX Attention op, or a decomposition.

Which one a precision gets is decided here (docs/onnx.md explains why):

- fp16, bf16: the standard ``Attention`` op (opset >= 23), which has fused kernels
  in onnxruntime and TensorRT. The dynamo exporter emits it by itself.
- fp32: a decomposition into MatMul / Softmax, because TensorRT rejects its
  attention layer in fp32 with small head sizes, and one fp32 graph must build
  everywhere::

      q --Mul(1/sqrt(d))--MatMul-- scores (B,H,n,n) --Where(row >= col, ., -inf)--Softmax--MatMul-- out
      k --Transpose(0,1,3,2)--+                                                             v --+
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset18 as op

USES_ATTENTION_OP = {"float32": False, "float16": True, "bfloat16": True}


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


def translations(precision_dtype: str) -> dict:
    """Extra custom_translation_table entries for a precision."""
    if USES_ATTENTION_OP[precision_dtype]:
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default: causal_attention_decomposed}


def masked_attention_decomposed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                scale=None, enable_gqa=False):
    """Translation of ``aten.scaled_dot_product_attention`` for the decode graph, every precision:
    one query against the fixed-size cache under a boolean mask (slots <= pos). Its inputs are float32
    there (the cache is state), where TensorRT's attention layer is not usable (see above)::

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
