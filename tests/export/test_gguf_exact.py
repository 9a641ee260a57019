"""`--precision gguf`: the weight MatMuls hold the GGUF's own Q4_0 / Q4_1 / Q8_0 blocks, so the weights the
export computes with are gguf's dequantisation bit for bit; refusals for a GGUF of another model and for a
missing or misplaced --gguf."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, NumericalFaultError  # noqa: E402
from infini_deploy.export import gguf_exact  # noqa: E402
from infini_deploy.export.engine import build_engines  # noqa: E402
from infini_deploy.export.exporter import export_model  # noqa: E402
from infini_deploy.models import load_checkpoint, spec  # noqa: E402
from infini_deploy.models.convert import convert  # noqa: E402

from helpers import invoke, one_line_error  # noqa: E402
from llama_fixtures import permute, tiny_llama, write_gguf  # noqa: E402

HEADS, KV_HEADS = 4, 2   # tiny_llama's
TENSORS = {"self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
           "self_attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
           "mlp/down_proj": "ffn_down"}
# format of the projections, of the embedding (and an untied head), tied head; Q4_1 + Q8_0 is SmolLM2's file
CASES = {"Q4_0": ("Q4_0", "Q4_0", False), "Q4_1": ("Q4_1", "Q8_0", True), "Q8_0": ("Q8_0", "Q8_0", True)}
CHANGED = "/layers.1/mlp/down_proj/MatMul"   # Q4_0 case: a weight changed after conversion (no GGUF match)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(format, the GGUF, its model, the export folder, the manifest), exported with --precision gguf."""
    quant, embd, tied = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    src = tiny_llama(tmp / "src", tied=tied, seed=7)
    path = write_gguf(src, tmp / "tiny.gguf", quant=quant, embd_quant=embd)
    convert(path, tmp / "ckpt", segment_len=32)
    model = load_checkpoint(tmp / "ckpt")
    if request.param == "Q4_0":
        with torch.no_grad():
            model.layers[1].mlp.down_proj.weight.mul_(1.5)
    manifest = export_model(model, tmp / "export", "gguf", gguf=path)
    return request.param, path, model, tmp / "export", manifest


def _gguf_tensors(path) -> dict:
    """name -> gguf's dequantisation, float32 [rows, K] (what transformers, and so `infini convert`, reads)."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}


def _source(node_name: str, tied: bool) -> tuple[str, int | None]:
    """The GGUF tensor a node's weight is (our names), and the heads llama.cpp permuted its rows over."""
    if node_name.startswith("/lm_head/"):
        return ("token_embd.weight" if tied else "output.weight"), None
    layer = node_name.split("/")[1].split(".")[1]
    part = next(ours for ours in TENSORS if f"/{ours}/" in node_name)
    heads = {"self_attn/q_proj": HEADS, "self_attn/k_proj": KV_HEADS}.get(part)
    return f"blk.{layer}.{TENSORS[part]}.weight", heads


def _model_weight(model, node_name: str) -> np.ndarray:
    """The converted model's float32 weight [N, K] the node replaced."""
    if node_name.startswith("/lm_head/"):
        return model.lm_head.weight.detach().numpy()
    layer = int(node_name.split("/")[1].split(".")[1])
    module, proj = next(ours for ours in TENSORS if f"/{ours}/" in node_name).split("/")
    return getattr(getattr(model.layers[layer], module), proj).weight.detach().numpy()


def _dequantize(node, inits: dict) -> np.ndarray:
    """W^T [N, K] by the op's definition, float32: (code - zero point) x scale, codes packed low bits first
    along K, zero point 2^(bits-1) when absent; Q4_1's offsets (the graph's offset MatMul) added after."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]])                          # [N, K/block, block*bits/8]
    codes = packed.reshape(n, -1) if bits == 8 else \
        np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1)                  # [N, K], low nibble first
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k // block)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]])
        zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :k // block] if bits == 4 else zp
    else:
        zp = np.full((n, k // block), 1 << (bits - 1))
    q = (codes.astype(np.int32) - np.repeat(zp, block, 1).astype(np.int32)).astype(np.float32)
    w = q * np.repeat(scales, block, 1)
    offsets = node.name.removesuffix("MatMulNBits") + "MatMulNBits.offsets"
    if offsets in inits:                                                          # Q4_1: d q + m
        w = w + np.repeat(numpy_helper.to_array(inits[offsets]).T, block, 1)
    return w


def _nodes(out, file):
    graph = onnx.load(str(out / file)).graph
    return graph, {i.name: i for i in graph.initializer}, [n for n in graph.node if n.op_type == "MatMulNBits"]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.slow
@pytest.mark.parametrize("file", ["segment.onnx", "decode.onnx", "chunk.onnx"])
def test_every_weight_is_the_ggufs_dequantisation_bit_for_bit(exported, file):
    fmt, path, model, out, manifest = exported
    tied = model.config.tie_embeddings
    tensors = _gguf_tensors(path)
    _, inits, nodes = _nodes(out, file)
    # 2 layers x 7 projections and the head; in the Q4_0 case one changed weight (CHANGED) stays float32
    expected = {"Q4_0": {"Q4_0": 14}, "Q4_1": {"Q4_1": 14, "Q8_0": 1}, "Q8_0": {"Q8_0": 15}}[fmt]
    assert manifest.quantization["nodes"] == expected and len(nodes) == sum(expected.values())
    assert manifest.quantization["float32"] == ([CHANGED] if fmt == "Q4_0" else [])
    for node in nodes:
        got = _dequantize(node, inits)
        name, heads = _source(node.name, tied)
        want = tensors[name]
        assert np.array_equal(_bits(got if heads is None else permute(got, heads)), _bits(want)), node.name
        assert np.array_equal(_bits(got), _bits(_model_weight(model, node.name))), node.name   # the graph's row order
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 4


def _subgraph(graph, inits: dict, x: str, y: str, accuracy: int) -> onnx.ModelProto:
    """The nodes computing y from x (the MatMulNBits, and Q4_1's offset term), MatMulNBits at ``accuracy``."""
    producers = {o: n for n in graph.node for o in n.output}
    wanted, names, used = [y], set(), set()
    while wanted:
        t = wanted.pop()
        if t == x or t in inits or not t or t in names:
            continue
        names.add(t)
        node = producers[t]
        used.add(node.name)
        wanted += list(node.input)
    nodes = []
    for node in graph.node:
        if node.name in used:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for a in copy.attribute:
                if a.name == "accuracy_level":
                    a.i = accuracy
            nodes.append(copy)
    needed = {i for n in nodes for i in n.input}
    sub = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)],
                            [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)],
                            [inits[i] for i in needed if i in inits])
    return helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.slow
def test_onnxruntime_times_the_identity_gives_the_ggufs_weights(exported):
    """At accuracy level 0 (float32 activations) x = I makes each weight node output W itself: onnxruntime reads
    the stored blocks as the GGUF's numbers. (The export ships level 4, whose int8 activations round I: 1/127
    x 127 is not 1 in float32.)"""
    fmt, path, model, out, _ = exported
    tensors = _gguf_tensors(path)
    graph, inits, nodes = _nodes(out, "segment.onnx")
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in nodes:
        k = {a.name: a.i for a in node.attribute}["K"]
        # the node's own output, or (Q4_1) the Add that sums it with the offset term
        y = node.output[0]
        after = consumers.get(y, [])
        y = after[0].output[0] if fmt == "Q4_1" and node.name != "/lm_head/MatMulNBits" else y
        session = ort.InferenceSession(_subgraph(graph, inits, node.input[0], y, 0).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        w = session.run(None, {node.input[0]: np.eye(k, dtype=np.float32)})[0]       # [K, N] = W
        name, heads = _source(node.name, model.config.tie_embeddings)
        got, want = (w.T if heads is None else permute(w.T, heads)), tensors[name]
        # + 0: a sum of products cannot return gguf's -0.0 (d (q - 8) for q = 8 and d < 0); every other bit equal
        assert np.array_equal(_bits(got), _bits(want + np.float32(0))), node.name


@pytest.mark.slow
def test_the_graph_at_float32_activations_equals_torch_and_the_shipped_one_agrees(exported):
    """The segment graph, its MatMulNBits set to accuracy level 0, over two segments: torch's float32 numbers
    to summation order (the weights are the same numbers). The shipped level-4 graph passed its gate."""
    _, _, model, out, manifest = exported
    proto = onnx.load(str(out / "segment.onnx"))
    for node in proto.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = torch.randint(0, model.config.vocab_size, (2, 2 * model.config.segment_len),
                           generator=torch.Generator().manual_seed(0))
    memory, norm = model.initial_state(2)
    ort_memory, ort_norm = memory.numpy(), norm.numpy()
    for seg in tokens.split(model.config.segment_len, 1):
        with torch.no_grad():
            logits, memory, norm = model.step(seg, memory, norm)
        got, ort_memory, ort_norm = session.run(None, {spec.TOKENS: seg.numpy(), spec.MEMORY: ort_memory,
                                                       spec.NORM: ort_norm})
        assert np.abs(got - logits.numpy()).max() < 1e-5 * max(1.0, float(logits.abs().max()))
        assert np.abs(ort_memory - memory.numpy()).max() < 1e-5 * float(memory.abs().max())
    agreement = manifest.validation["agreement"]
    assert agreement["logits_cosine"] > 0.999 and agreement["top1_agreement"] > 0.95, agreement


@pytest.mark.slow
def test_the_tied_head_reads_the_embeddings_blocks_and_the_lookup_keeps_the_table(exported):
    _, _, model, out, _ = exported
    if not model.config.tie_embeddings:
        pytest.skip("an untied head is an initializer MatMul like the others")
    graph, inits, nodes = _nodes(out, "decode.onnx")
    assert "/lm_head/MatMulNBits" in [n.name for n in nodes]
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.name.startswith("/lm_head/")]
    (gather,) = [n for n in graph.node if n.name == "/embed_tokens/Gather"]
    table = numpy_helper.to_array(inits[gather.input[0]])
    assert table.dtype == np.float32 and np.array_equal(table, model.embed_tokens.weight.detach().numpy())


@pytest.mark.slow
def test_the_gate_refuses_blocks_copied_in_llama_cpps_nibble_order(tmp_path, monkeypatch):
    """llama.cpp's 4-bit blocks copied as they are (byte j: elements j and j + 16; MatMulNBits reads 2j and
    2j + 1) scramble every block: the validation gate refuses the export and no folder is written."""
    src = tiny_llama(tmp_path / "src", seed=9)
    path = write_gguf(src, tmp_path / "q.gguf", quant="Q4_0")
    convert(path, tmp_path / "ckpt", segment_len=32)
    monkeypatch.setattr(gguf_exact, "_q4_codes", lambda qs: qs)
    with pytest.raises(NumericalFaultError, match=r"segment graph \(gguf, onnxruntime CPU\) disagrees with torch"):
        export_model(load_checkpoint(tmp_path / "ckpt"), tmp_path / "out", "gguf", gguf=path)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_verify_and_run_take_a_gguf_export(exported):
    _, _, _, out, _ = exported
    res = invoke("verify", out, "--segments", 2)
    assert res.exit_code == 0 and "all within the gguf tolerance" in res.output, res.output
    res = invoke("run", out, "--tokens", 100, "--no-progress")
    assert res.exit_code == 0, res.output


def test_tensorrt_refuses_a_gguf_export(exported):
    with pytest.raises(BadInputError, match="is a gguf export, quantized for onnxruntime's CPU kernels"):
        build_engines(exported[3])


def test_a_gguf_of_another_model_is_refused_before_exporting(exported, tmp_path):
    _, _, model, _, _ = exported
    other = write_gguf(tiny_llama(tmp_path / "other", seed=8), tmp_path / "other.gguf", quant="Q4_0")
    with pytest.raises(IncompatibleArtifactError, match=r"none of its 16 Q4_0 tensors holds one of this model's "
                                                        r"weights \(compared by value, rows in any order\)"):
        export_model(model, tmp_path / "out", "gguf", gguf=other)
    assert not (tmp_path / "out").exists()
    f32 = write_gguf(tmp_path / "other", tmp_path / "f32.gguf")
    with pytest.raises(BadInputError, match=r"holds no Q4_0, Q4_1, Q8_0 matrix \(its matrices: F32\)"):
        export_model(model, tmp_path / "out", "gguf", gguf=f32)


def test_the_cli_needs_gguf_exactly_with_precision_gguf(exported, tmp_path):
    _, path, _, out, _ = exported
    checkpoint = out / "checkpoint"
    one_line_error(invoke("export", checkpoint, tmp_path / "a", "--precision", "gguf"),
                   "--precision gguf needs --gguf FILE.gguf (the file the model was converted from)")
    one_line_error(invoke("export", checkpoint, tmp_path / "b", "--precision", "int4", "--gguf", path),
                   "--gguf is for --precision gguf; got --precision int4")
    one_line_error(invoke("export", checkpoint, tmp_path / "c", "--precision", "gguf", "--gguf", tmp_path / "no.gguf"),
                   "no.gguf is not a file; expected the .gguf file the model was converted from")
    assert not any((tmp_path / name).exists() for name in "abc")
