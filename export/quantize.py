"""int8 and int4 copies of the exported graphs, made by onnxruntime's own quantization tools.

- **int8**: dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): weights int8 per output
  channel in 7 bits (``reduce_range``), stored quantized; activations quantized per tensor at run time
  (DynamicQuantizeLinear + MatMulInteger, which use VNNI / AMX where the CPU has them). 7 bits because
  without VNNI the uint8 x int8 products go through ``vpmaddubsw``, whose 16-bit pair sums saturate with
  8-bit weights: the same graph then gives other numbers on such a CPU (docs/quantization.md).
- **int4**: weight-only, ``MatMulNBitsQuantizer`` (the contrib op MatMulNBits): 4-bit weights in blocks of
  ``INT4_BLOCK`` along the input dimension with a scale per block, symmetric; ``INT4_ACCURACY`` 4 lets the
  CPU kernel quantize activations to int8 and use integer dot products.

Only MatMuls whose weight is an initializer are quantized: the attention projections, the MLP and the LM
head, except, in int8, the MLP's down projections (``INT8_KEEP_FLOAT``): their input is the SwiGLU product,
whose outlier channels one int8 scale per tensor cannot hold (measured on SmolLM2-135M, real text, top-1
agreement with fp32: 59% with them quantized, 81% without; docs/cpu.md). The memory path (retrieval sigma(Q)M, the update sigma(K)^T V, the delta term, the normaliser) multiplies
activations by state, so it has no initializer and stays float32, as do the state inputs and outputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from ..errors import MissingBackendError

QUANTIZED = ("int8", "int8w", "int4", "gguf")   # gguf: export/gguf_exact.py
INT8_KEEP_FLOAT = ("/down_proj/",)   # node-name parts of the weight MatMuls int8 leaves in float32
INT4_BLOCK = 32
INT4_ACCURACY = 4
HEAD_BITS = 8                        # int8w and int4: the LM head's weights (its logits pick the token)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes of the main graph whose second input is a (weight) initializer."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights]


def untie_head(model: onnx.ModelProto) -> str | None:
    """Give a tied LM head its own weight: the MatMul that reads the embedding through a Transpose gets the
    transposed table as an initializer, so the quantizer can store it (the embedding's Gather keeps the float32
    table; a file holds both). Returns the head MatMul's name, or None when no MatMul reads a transposed
    initializer. The head is read whole at every token: 21% of SmolLM2-135M's bytes."""
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    transposes = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in transposes:
            source = weights[transposes[node.input[1]].input[0]]
            table = numpy_helper.to_array(source)
            if table.ndim != 2:
                continue
            name = f"{source.name}.transposed"
            model.graph.initializer.append(numpy_helper.from_array(table.T.copy(), name))
            transpose, node.input[1] = transposes[node.input[1]], name
            if not any(transpose.output[0] in n.input for n in model.graph.node):   # read by nothing else now
                model.graph.node.remove(transpose)
            return node.name
    return None


def quantize_graph(src: Path, dst: Path, precision: str) -> dict:
    """Write a quantized copy of the float32 graph ``src`` to ``dst`` (its metadata, the graph's identity,
    kept); the record for the manifest."""
    import logging

    root = logging.getLogger()
    handlers, level, previous = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(logging.WARNING)   # the tools log every node at INFO, and advise pre-processing at WARNING
    try:
        return _quantize(src, dst, precision)
    finally:
        logging.disable(previous)
        # importing matmul_nbits_quantizer calls logging.basicConfig(level=INFO): every later INFO record of
        # any library (onnx_ir's passes in the next export) would reach the user's terminal
        root.handlers[:], root.level = handlers, level


def _quantize(src: Path, dst: Path, precision: str) -> dict:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:   # pragma: no cover (onnxruntime is a base dependency)
        raise MissingBackendError(f"quantized exports need onnxruntime's quantization tools: {e}") from None
    model = onnx.load(str(src))
    nodes = weight_matmuls(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    large = model.ByteSize() > 1_500_000_000
    if precision == "int8":
        kept = [n for n in nodes if any(part in n for part in INT8_KEEP_FLOAT)]
        nodes = [n for n in nodes if n not in kept]
        del model
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:   # quantize_dynamic writes beside its output
            out = Path(tmp) / dst.name
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=nodes, per_channel=True, reduce_range=True,
                             use_external_data_format=large, extra_options={"MatMulConstBOnly": True})
            save_graph(onnx.load(str(out)), dst, metadata)
        return {"method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 per channel",
                "activations": "int8 per tensor, dynamic", "nodes": len(nodes),
                "float32": f"{len(kept)} MLP down projections (outlier activations)"}
    if precision in ("int8w", "int4"):
        head = untie_head(model)
        nodes = weight_matmuls(model)
        bits = 8 if precision == "int8w" else 4
        for width, chosen in ((HEAD_BITS, [head] if head else []), (bits, [n for n in nodes if n != head])):
            if chosen:   # the head first, in 8 bits; then the rest (a MatMulNBits node is no MatMul any more)
                quantizer = MatMulNBitsQuantizer(model, bits=width, block_size=INT4_BLOCK, is_symmetric=True,
                                                 accuracy_level=INT4_ACCURACY,
                                                 nodes_to_exclude=[n.name for n in model.graph.node
                                                                   if n.op_type == "MatMul" and n.name not in chosen])
                quantizer.process()
                model = quantizer.model.model
        save_graph(model, dst, metadata)
        return {"method": "onnxruntime.quantization.MatMulNBitsQuantizer (MatMulNBits)",
                "weights": f"int{bits} symmetric, blocks of {INT4_BLOCK}"
                           + (f"; the LM head int{HEAD_BITS}" if head and bits != HEAD_BITS else ""),
                "activations": f"float32 (accuracy level {INT4_ACCURACY}: int8 inside the kernel)",
                "nodes": len(nodes), "lm_head": f"int{HEAD_BITS}" if head else "none"}
    raise ValueError(f"not a quantized precision: {precision!r}")


def save_graph(model: onnx.ModelProto, dst: Path, metadata: dict) -> None:
    """Save ``model`` with the graph's metadata (its identity); weights past 1.9 GB go to DST.data."""
    onnx.helper.set_model_props(model, metadata)
    large = model.ByteSize() > 1_900_000_000
    onnx.save(model, str(dst), save_as_external_data=large, location=f"{dst.name}.data" if large else None)
