"""The segment and decode steps as ONNX graphs: trace, translate, tidy, name, check.

``export_segment(model, path, precision, opset)`` and ``export_decode(...)`` are
the whole stage for each graph; the helpers below them are its steps, in order.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch

from ..errors import BadInputError, IncompatibleArtifactError
from ..models import spec
from ..models.manifest_schema import IDENTITY
from ..models.chunk import ChunkStep
from ..models.decode import DecodeStep, initial_decode_state
from ..models.model import InfiniTransformer
from ..runtime.runner import TORCH_DTYPES
from . import attention, memory_function, workarounds

PRECISIONS = spec.PRECISIONS
# Weights past this go to "<graph>.onnx.data" next to the graph: protobuf cannot serialise a message of
# 2 GiB or more, so one file cannot hold them (ONNX's external data; onnxruntime and TensorRT's parser
# read it from the graph's folder). The margin leaves room for the graph itself.
EXTERNAL_DATA_BYTES = (2 << 30) - (128 << 20)
DEFAULT_OPSET = 23
MIN_OPSET = {"fp32": 18, "fp16": 23, "bf16": 23, "int8": 18, "int8w": 18, "int4": 18, "gguf": 18}   # the Attention op needs 23


class SegmentStep(torch.nn.Module):
    """``model.step`` as a module with the spec's inputs, for torch.onnx.export."""

    def __init__(self, model: InfiniTransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, memory, norm, past=None):
        return self.model.step(tokens, memory, norm, past)   # past: attend_previous models (models/spec.py)


def check_precision(precision: str, opset: int) -> None:
    if precision not in PRECISIONS:
        raise BadInputError(f"precision {precision!r} is not known; expected one of: {', '.join(PRECISIONS)}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET[precision] <= opset <= newest:
        raise BadInputError(f"opset {opset} cannot export {precision}: expected {MIN_OPSET[precision]} to {newest} "
                            f"(the installed onnx {onnx.__version__} knows up to {newest})")


def cast_model(model: InfiniTransformer, precision: str) -> InfiniTransformer:
    """A copy of ``model`` with weights in the precision's dtype (state stays float32 in step)."""
    return copy.deepcopy(model).to(TORCH_DTYPES[PRECISIONS[precision]]).eval()


def export_segment(model: InfiniTransformer, path: Path, precision: str = "fp32",
                   opset: int = DEFAULT_OPSET, fused: bool = False) -> onnx.ModelProto:
    """Write the segment step of ``model`` (float32 weights) to ``path`` in ``precision``.

    Inputs tokens int64 [batch, n], memory/norm float32 [L, batch, ...]; outputs
    logits (precision dtype) and memory_out/norm_out (float32). Returns the saved proto.
    """
    return _export("segment", model, path, precision, opset, fused)


def export_decode(model: InfiniTransformer, path: Path, precision: str = "fp32",
                  opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write the decode step (models/decode.py) of ``model`` to ``path`` in ``precision``.

    Inputs token, pos int64 [batch], memory/norm and the decode state float32; outputs
    logits (precision dtype) [batch, V] and the decode state float32. Standard ops only:
    the memory read and the pending update are plain nodes (docs/onnx.md says why).
    """
    return _export("decode", model, path, precision, opset)


def export_chunk(model: InfiniTransformer, path: Path, precision: str = "fp32",
                 opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write the chunk step (models/chunk.py) of ``model`` to ``path`` in ``precision``: tokens [batch, n]
    appended at pos [batch] to the decode state's cache; outputs logits [batch, n, V] and the decode state."""
    return _export("chunk", model, path, precision, opset)


def _export(graph: str, model: InfiniTransformer, path: Path, precision: str, opset: int,
            fused: bool = False) -> onnx.ModelProto:
    """Trace, tidy, name, check and save one graph; returns the proto (without external weights)."""
    check_precision(precision, opset)
    if precision in ("int8", "int8w", "int4", "gguf"):
        raise BadInputError(f"{precision} graphs are float32 graphs quantized afterwards: export with "
                            f"export_model(..., precision={precision!r}) (export/quantize.py, gguf_exact.py)")
    if fused and precision != "fp32":
        raise BadInputError(f"fused graphs are fp32 (and the int8/int4 graphs quantized from them); got {precision!r}")
    program = _trace(graph, cast_model(model, precision), precision, opset, fused)
    ir_model = program.model
    del program
    _tidy(ir_model, opset)
    _name_symbolic_outputs(ir_model, spec.graph_specs(graph, model.config)[1])
    _name_nodes(ir_model)
    ir_model.producer_name = "infini-deploy"
    set_identity(ir_model, graph, model)
    if weight_bytes(ir_model) < EXTERNAL_DATA_BYTES:
        proto = ir.serde.serialize_model(ir_model)
        check_graph(proto, memory_node=graph == "segment")
        onnx.save(proto, str(path))
    else:   # checked from the file: the checker cannot serialise a proto of 2 GiB or more either
        ir.save(ir_model, str(path), external_data=external_data_name(path))
        check_graph(str(path), memory_node=graph == "segment")
        proto = onnx.load(str(path), load_external_data=False)
    check_io(proto, *spec.graph_specs(graph, model.config, PRECISIONS[precision]))
    return proto


def set_identity(ir_model: ir.Model, graph: str, model: InfiniTransformer) -> None:
    """Name in the graph's own metadata which step it is and the model it computes (config digest, weights'
    tensors), so a graph swapped for another one's, its hash rewritten, is still refused
    (models/manifest_schema.check_identity)."""
    from ..models.checkpoint import weights_digest

    identity = {IDENTITY["graph"]: graph, IDENTITY["config"]: model.config.digest(),
                IDENTITY["weights"]: weights_digest(model)}
    ir_model.metadata_props.update(identity)




def weight_bytes(model: ir.Model) -> int:
    """Bytes of the graph's initializers (the weights)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def external_data_name(path: Path) -> str:
    """The external data file of a graph: ``segment.onnx`` -> ``segment.onnx.data`` (in the same folder)."""
    return Path(path).name + ".data"


def graph_files(path: Path) -> list[str]:
    """The files a saved graph consists of, by name: the graph, and its external data when it has some."""
    data = Path(path).with_name(external_data_name(path))
    return [Path(path).name, *([data.name] if data.is_file() else [])]


def _trace(graph: str, model: InfiniTransformer, precision: str, opset: int, fused: bool = False):
    cfg = model.config
    inputs, outputs = spec.graph_specs(graph, cfg)
    batch = torch.export.Dim(spec.BATCH, min=1, max=1 << 16)
    memory, norm = model.initial_state(batch=2)
    if graph == "segment":
        seq = torch.export.Dim(spec.SEQ, min=1, max=cfg.segment_len)
        dims = {spec.TOKENS: {0: batch, 1: seq}, spec.MEMORY: {1: batch}, spec.NORM: {1: batch}}
        module, args = SegmentStep(model), (torch.zeros(2, cfg.segment_len, dtype=torch.int64), memory, norm)
        args = (*args, *_past(cfg, dims, batch))
        table = {torch.ops.infini.memory.default: memory_function.translate_memory,
                 **(attention.decode_translations() if cfg.attend_previous and not fused   # the past under a mask
                    else attention.translations(PRECISIONS[precision], fused))}
    elif graph == "chunk":
        seq = torch.export.Dim(spec.SEQ, min=1, max=cfg.segment_len)
        dims = {s.name: {0: batch} if s.name == spec.POS else {1: batch} for s in inputs}
        dims[spec.TOKENS] = {0: batch, 1: seq}
        n = max(2, cfg.segment_len // 2)   # neither 1 nor N, so the trace keeps n symbolic
        tokens, pos = torch.zeros(2, n, dtype=torch.int64), torch.tensor([0, 1])
        module, args = ChunkStep(model), (tokens, pos, memory, norm, *initial_decode_state(cfg, 2), *_past(cfg, dims, batch))
        table = attention.decode_translations()
    else:
        dims = {s.name: {0 if s.name in (spec.TOKEN, spec.POS) else 1: batch} for s in inputs}
        token, pos = torch.zeros(2, dtype=torch.int64), torch.tensor([0, 1])
        module, args = DecodeStep(model), (token, pos, memory, norm, *initial_decode_state(cfg, 2), *_past(cfg, dims, batch))
        table = attention.decode_translations()
    with torch.no_grad(), workarounds.keep_local_functions(), workarounds.quiet_exporter():
        return torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, optimize=False, verbose=False,
            input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
            dynamic_shapes=tuple(dims[s.name] for s in inputs), custom_translation_table=table)


def _past(cfg, dims: dict, batch) -> tuple:
    """An attend_previous model's past for the trace, its dims added to ``dims``; () for any other model.
    Traced full (neither 0 nor 1 keys, so its length stays symbolic); every step takes it last."""
    if not cfg.attend_previous:
        return ()
    full = spec.past_spec(cfg).max_dims[spec.PAST_LEN]
    dims[spec.PAST] = {2: batch, 4: torch.export.Dim(spec.PAST_LEN, min=0, max=full)}
    return (torch.zeros(cfg.n_layer, 2, 2, cfg.kv_heads, full, cfg.d_head),)


def _tidy(model: ir.Model, opset: int) -> None:
    """Inline torchlib helpers, keep the memory functions, declare the opset, fold constants."""
    workarounds.inline_helpers(model, keep=memory_function.is_memory_function)
    workarounds.set_opset(model, opset)
    onnxscript.optimizer.optimize_ir(model, inline=False)
    for function in model.functions.values():
        memory_function.name_function_nodes(function)


def _name_symbolic_outputs(model: ir.Model, outputs: list) -> None:
    """Give output dims the spec's names where the exporter wrote an expression of the inputs' (past_out's
    length: ``min(past_len, 4) + n``); every other dim is left as traced, for check_io to compare."""
    for value, s in zip(model.graph.outputs, outputs):
        if value.shape is None or len(value.shape) != len(s.shape):
            continue
        dims = [d if isinstance(want, int) or str(d) == want or want not in (spec.PAST_OUT_LEN,) else ir.SymbolicDim(want)
                for d, want in zip(value.shape, s.shape)]
        value.shape = ir.Shape(dims)


def _name_nodes(model: ir.Model) -> None:
    """Hierarchical names from the module path: ``/layers.0/self_attn/q_proj/MatMul``, unique."""
    seen = Counter()
    for node in model.graph:
        name = f"/{_module_path(node)}/{_op_label(node)}".replace("//", "/")
        seen[name] += 1
        node.name = name if seen[name] == 1 else f"{name}_{seen[name] - 1}"


def _module_path(node: ir.Node) -> str:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return ""
    modules = [s for s in eval_list(scopes)[:-1] if s and not s.startswith("_")]  # drop the aten op
    path = modules[-1].removeprefix("model.") if modules else ""
    if node.domain == memory_function.DOMAIN:
        path += "/infini"
    # "layers.0.self_attn.q_proj" -> "layers.0/self_attn/q_proj"
    return re.sub(r"\.(?!\d)", "/", path)


def _op_label(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", memory_function.DOMAIN) else f"{node.domain}.{node.op_type}"


def eval_list(text: str) -> list[str]:
    """The exporter stores name scopes as a Python list literal of strings."""
    return re.findall(r"'([^']*)'", text)


def check_graph(proto: onnx.ModelProto | str, memory_node: bool = True) -> None:
    """ONNX checker (full, with strict shape inference) and, for the segment graph
    (``memory_node``), the memory node with its local function present. ``proto`` may be a path
    (a graph with external data)."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise IncompatibleArtifactError(f"the exported graph fails the ONNX checker: {e}") from None
    if not memory_node:
        return
    if isinstance(proto, str):
        proto = onnx.load(proto, load_external_data=False)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    functions = {(f.domain, f.name) for f in proto.functions}
    memory_ops = {(d, o) for d, o in ops if d == memory_function.DOMAIN}
    if not memory_ops or not memory_ops <= functions:
        raise IncompatibleArtifactError(f"the exported graph lacks the {memory_function.DOMAIN} memory node "
                                        f"or its local function (nodes {sorted(memory_ops)}, functions "
                                        f"{sorted(functions)})")


ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT,
               "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}


def check_io(proto: onnx.ModelProto, inputs: list, outputs: list) -> None:
    """The graph's inputs and outputs are exactly the spec's: names, order, dtypes, dims (symbolic by name)."""
    for kind, values, specs in (("input", proto.graph.input, inputs), ("output", proto.graph.output, outputs)):
        got = [(v.name, v.type.tensor_type.elem_type,
                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]
        want = [(s.name, ONNX_DTYPES[s.dtype], tuple(s.shape)) for s in specs]
        if got != want:
            raise IncompatibleArtifactError(f"exported graph {kind}s {got} do not match the spec {want}")
