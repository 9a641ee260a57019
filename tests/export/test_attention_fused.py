"""`infini export --fused`: the segment graph's local attention as onnxruntime's GroupQueryAttention, equal to
the standard graph and to torch, quantizable, and refused by the TensorRT build."""

import onnx
import pytest
import torch

from infini_deploy.errors import BadInputError
from infini_deploy.export.attention import CONTRIB, FUSED
from infini_deploy.export.engine import build_engines
from infini_deploy.export.exporter import export_model
from infini_deploy.models import init_model
from infini_deploy.runtime import Stream
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.runtime.torch_runner import TorchRunner

from helpers import gqa_config

pytestmark = pytest.mark.slow   # every test here shares a fused export (about 45 s to make)


@pytest.fixture(scope="module")
def model():
    m = init_model(gqa_config("delta"), seed=4)      # 4 query heads over 2 KV heads, open gates
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, 4) + i)
    return m


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {name: (export_model(model, root / name, precision, fused=fused), root / name)
            for name, precision, fused in (("standard", "fp32", False), ("fused", "fp32", True),
                                           ("fused-int8", "int8", True))}


def test_the_fused_segment_graph_has_the_contrib_attention_and_no_softmax(exports):
    manifest, out = exports["fused"]
    assert manifest.attention == FUSED
    nodes = onnx.load(str(out / manifest.graphs["segment"].file)).graph.node
    ops = [(n.domain, n.op_type) for n in nodes]
    assert ops.count((CONTRIB, "GroupQueryAttention")) == 2                    # one per layer
    assert not any(op == "Softmax" for _, op in ops)
    decode = onnx.load(str(out / manifest.graphs["decode"].file)).graph.node
    assert not any(n.domain == CONTRIB for n in decode)                        # cache attention: standard ops
    assert exports["standard"][0].attention == "decomposed"


def test_the_fused_graph_streams_the_same_numbers_as_the_standard_one_and_torch(exports, model):
    tokens = torch.randint(0, 256, (2, 3 * model.config.segment_len + 17), generator=torch.Generator().manual_seed(5))
    reference = Stream(TorchRunner(model), batch=2).feed(tokens, keep="all")
    standard = Stream(OrtRunner(exports["standard"][1], threads=1), batch=2)
    fused = Stream(OrtRunner(exports["fused"][1], threads=1), batch=2)
    a, b = standard.feed(tokens, keep="all"), fused.feed(tokens, keep="all")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, reference, rtol=1e-4, atol=1e-4)
    for x, y in zip(fused.state, standard.state):
        assert y.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_a_fused_int8_export_validates_and_keeps_its_contrib_attention(exports):
    manifest, out = exports["fused-int8"]
    assert manifest.precision == "int8" and manifest.attention == FUSED
    ops = [n.op_type for n in onnx.load(str(out / manifest.graphs["segment"].file)).graph.node]
    assert "GroupQueryAttention" in ops and "MatMulInteger" in ops
    assert manifest.validation["worst"]["top1_agreement"] >= 0.85


def test_fused_exports_are_refused_where_they_cannot_run(exports, model, tmp_path):
    with pytest.raises(BadInputError, match="exported with --fused: its local attention is onnxruntime's contrib"):
        build_engines(exports["fused"][1])
    with pytest.raises(BadInputError, match="--fused graphs are fp32, int8, int4 or gguf"):
        export_model(model, tmp_path / "x", "fp16", opset=23, fused=True)
