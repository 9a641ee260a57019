"""Run a bfloat16 graph where onnxruntime has no bfloat16 kernels (the CPU provider).

onnxruntime's CPU provider refuses bf16 graphs at session creation:

    NOT_IMPLEMENTED : Could not find an implementation for Mul(14) node with name
    '/layers.0/input_layernorm/Mul_1'

So, in memory and never on disk, every bf16 tensor becomes float32 and every
value the graph computed in bf16 is rounded to bf16 right after its node
(Cast to bf16, Cast back). Weights are bf16 values exactly; each op then sees
the same inputs as a bf16 kernel that accumulates in float32 (as GPU kernels
do), so this checks the bf16 graph itself on a CPU. The file keeps bf16; the
CUDA provider and TensorRT run it as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT


def emulate_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 copy of a bf16 ``model`` that rounds every bf16 value; graph outputs become float32."""
    model = onnx.shape_inference.infer_shapes(model, data_prop=False)
    graph = model.graph
    bf16 = {v.name for v in [*graph.value_info, *graph.output, *graph.input] if v.type.tensor_type.elem_type == BF16}
    for init in graph.initializer:
        if init.data_type == BF16:
            init.CopyFrom(numpy_helper.from_array(_bf16_to_f32(init), init.name))
    nodes = []
    for node in graph.node:
        _retype_attributes(node)
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in bf16:
                node.output[i] = f"{name}__f32"
                nodes += _round(f"{name}__f32", name)
    del graph.node[:]
    graph.node.extend(nodes)
    for function in model.functions:
        for node in function.node:
            _retype_attributes(node)
    for v in [*graph.input, *graph.output]:
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
    del graph.value_info[:]
    return model


def _round(src: str, dst: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Cast", [src], [f"{dst}__bf16"], name=f"{dst}/to_bf16", to=BF16),
            helper.make_node("Cast", [f"{dst}__bf16"], [dst], name=f"{dst}/to_f32", to=F32)]


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Cast(to=bf16) -> Cast(to=float32) (its output is rounded after); bf16 Constants -> float32."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == BF16:
            attr.i = F32
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
            attr.t.CopyFrom(numpy_helper.from_array(_bf16_to_f32(attr.t), attr.t.name))


def _bf16_to_f32(tensor: onnx.TensorProto) -> np.ndarray:
    if tensor.raw_data:
        bits = np.frombuffer(tensor.raw_data, dtype=np.uint16)
    else:
        bits = np.asarray(tensor.int32_data, dtype=np.uint32).astype(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(tensor.dims))
