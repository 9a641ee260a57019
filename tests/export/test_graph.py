"""The exported segment graph: one local-function memory node per layer, attention per precision, names."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from infini_deploy.errors import BadInputError
from infini_deploy.export.exporter import SEGMENT_FILE
from infini_deploy.export.graph import export_segment
from infini_deploy.models.manifest import load_manifest
from infini_deploy.models import spec


def _ops(proto):
    return [(n.domain, n.op_type) for n in proto.graph.node]


def test_memory_block_is_one_custom_node_per_layer_backed_by_a_local_function(tiny_fp32, tiny_linear_model):
    proto = onnx.load(str(tiny_fp32 / SEGMENT_FILE))
    memory_nodes = [n for n in proto.graph.node if n.domain == "infini"]
    assert [n.op_type for n in memory_nodes] == ["Memory"] * tiny_linear_model.config.n_layer
    assert [n.name for n in memory_nodes] == [f"/layers.{i}/self_attn/infini/Memory"
                                              for i in range(tiny_linear_model.config.n_layer)]
    (function,) = [f for f in proto.functions if f.domain == "infini"]
    assert function.name == "Memory" and list(function.attribute) == ["eps"]
    assert {n.domain for n in function.node} == {""}            # standard ops only
    assert {"Elu", "MatMul", "Sigmoid", "ReduceSum"} <= {n.op_type for n in function.node}
    stages = {n.name.split("/")[0] for n in function.node}
    assert stages == {"retrieve", "gate", "update"}
    assert not [f for f in proto.functions if f.domain != "infini"]  # torchlib helpers inlined
    onnx.checker.check_model(proto, full_check=True)


def test_node_names_are_hierarchical_and_unique(tiny_fp32):
    names = [n.name for n in onnx.load(str(tiny_fp32 / SEGMENT_FILE)).graph.node]
    assert len(set(names)) == len(names)
    assert any(n.startswith("/layers.1/self_attn/q_proj/MatMul") for n in names)
    assert any(n.startswith("/layers.0/mlp/") for n in names)
    assert all(n.startswith("/") for n in names)


def test_fp32_decomposes_attention(tiny_fp32):
    ops = {op for _, op in _ops(onnx.load(str(tiny_fp32 / SEGMENT_FILE)))}
    assert "Attention" not in ops and "Softmax" in ops
    assert load_manifest(tiny_fp32).attention == "decomposed"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_uses_attention_op_and_keeps_state_float32(export_factory, precision):
    folder = export_factory(precision)
    proto = onnx.load(str(folder / SEGMENT_FILE))
    assert ("", "Attention") in _ops(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    low = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    assert types == {spec.TOKENS: onnx.TensorProto.INT64, spec.MEMORY: onnx.TensorProto.FLOAT,
                     spec.NORM: onnx.TensorProto.FLOAT, spec.LOGITS: low,
                     spec.MEMORY_OUT: onnx.TensorProto.FLOAT, spec.NORM_OUT: onnx.TensorProto.FLOAT}
    weights = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == low for i in weights)


def test_plain_onnxruntime_session_runs_dynamic_batch_and_partial_segment(tiny_fp32, tiny_linear_model):
    """No custom-op library, no session options: onnxruntime runs the local function as it is."""
    session = ort.InferenceSession(str(tiny_fp32 / SEGMENT_FILE), providers=["CPUExecutionProvider"])
    symbolic = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in onnx.load(str(tiny_fp32 / SEGMENT_FILE)).graph.input}
    assert symbolic[spec.TOKENS] == [spec.BATCH, spec.SEQ] and symbolic[spec.MEMORY][1] == spec.BATCH
    for batch, n in [(3, 5), (1, tiny_linear_model.config.segment_len)]:
        gen = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, 260, (batch, n), generator=gen)
        memory, norm = tiny_linear_model.initial_state(batch)
        memory, norm = memory + torch.rand(memory.shape, generator=gen), norm + torch.rand(norm.shape, generator=gen)
        out = session.run(None, {spec.TOKENS: tokens.numpy(), spec.MEMORY: memory.numpy(), spec.NORM: norm.numpy()})
        with torch.no_grad():
            ref = tiny_linear_model.step(tokens, memory, norm)
        for got, want in zip(out, ref):
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_opset_below_23_refused_for_fp16(tiny_linear_model, tmp_path):
    with pytest.raises(BadInputError, match="opset 18 cannot export fp16: expected 23"):
        export_segment(tiny_linear_model, tmp_path / "x.onnx", "fp16", opset=18)
    with pytest.raises(BadInputError, match="precision 'int3' is not known"):
        export_segment(tiny_linear_model, tmp_path / "x.onnx", "int3")
    with pytest.raises(BadInputError, match="int8 graphs are float32 graphs quantized afterwards"):
        export_segment(tiny_linear_model, tmp_path / "x.onnx", "int8")
