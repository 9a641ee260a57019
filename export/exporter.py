"""``export_model``: checkpoint -> segment.onnx + decode.onnx + infini.json, validated, written atomically.

Stages, each with its artifact in a temp folder next to OUT_DIR: the checkpoint
(weights for `infini verify`), the graphs, the manifest; then both graphs run in
onnxruntime against the torch model (segment: batch 2, full segments and a partial
one; decode: batch 2, token by token across a filled cache and its fold) and only
a folder whose graphs match is renamed into place.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import torch

from .. import __version__
from ..atomic import atomic_folder
from ..errors import BadInputError, InfiniError
from ..models import spec
from ..models.checkpoint import CHECKPOINT_FILES, weights_digest, write_checkpoint
from ..models.model import InfiniTransformer
from ..paths import parse_json
from . import attention, memory_function
from .graph import (DEFAULT_OPSET, PRECISIONS, check_precision, export_chunk, export_decode, export_segment,
                    graph_files)
from ..models.manifest import CHECKPOINT_DIR, MANIFEST_FILE, GraphEntry, Manifest, sha256_file
from .gguf_exact import GgufWeights, check_weights_match, gguf_graph, gguf_record, read_gguf_weights
from .quantize import QUANTIZED, quantize_graph

SEGMENT_FILE = "segment.onnx"
DECODE_FILE = "decode.onnx"
CHUNK_FILE = "chunk.onnx"
VALIDATION = {"segments": 3, "batch": 2}   # two full segments, then a partial one
DECODE_EXTRA = 8                           # decode validation: a segment's worth of tokens, a fold, 8 more


def export_model(model: InfiniTransformer, out_dir, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                 force: bool = False, validate: bool = True, tokenizer=None, fused: bool = False,
                 gguf=None) -> Manifest:
    """Export ``model`` (float32 weights) to ``out_dir``; NumericalFaultError if onnxruntime disagrees.

    ``gguf``: the GGUF file the model was converted from, for precision "gguf" (and only for it): the weight
    MatMuls hold its Q4_0 / Q4_1 / Q8_0 blocks (export/gguf_exact.py); refused when none of them matches.

    ``fused``: the segment graph's local attention is onnxruntime's contrib GroupQueryAttention
    (export/attention.py): faster on onnxruntime, not parsed by TensorRT. fp32, int8 and int4 only.

    ``tokenizer`` (models/tokenizer.py): its files go into the export's checkpoint/ and the manifest,
    so runners of the folder encode and decode with the model's own vocabulary.
    """
    out = Path(out_dir)
    check_precision(precision, opset)
    if fused and precision not in ("fp32", *QUANTIZED):
        raise BadInputError(f"--fused graphs are fp32, int8, int4 or gguf (fp16/bf16 graphs already use the standard "
                            f"Attention op); got {precision!r}")
    weights = _gguf_weights(model, precision, gguf)
    with atomic_folder(out, force, owned_export, "export folder") as tmp:
        started = time.perf_counter()
        manifest = _write(model.eval(), tmp, precision, opset, tokenizer, fused, weights)
        written = time.perf_counter()
        if validate:
            manifest = _validate(model, tmp, manifest, validation_text(tokenizer))
            seconds = {"export_s": round(written - started, 1), "validate_s": round(time.perf_counter() - written, 1)}
            manifest = Manifest(**{**manifest.__dict__, "validation": {**manifest.validation, **seconds}})
            manifest.write(tmp)
    return manifest


def _gguf_weights(model: InfiniTransformer, precision: str, gguf) -> GgufWeights | None:
    """The GGUF's blocks for precision "gguf", checked against the model's weights before any export."""
    if (precision == "gguf") != (gguf is not None):
        raise BadInputError("--precision gguf needs --gguf FILE.gguf (the file the model was converted from)"
                            if gguf is None else f"--gguf is for --precision gguf; got --precision {precision}")
    if gguf is None:
        return None
    weights = read_gguf_weights(gguf)
    check_weights_match(weights, {n: p.detach().float().numpy() for n, p in model.state_dict().items()})
    return weights


def _write(model: InfiniTransformer, folder: Path, precision: str, opset: int, tokenizer=None,
           fused: bool = False, weights: GgufWeights | None = None) -> Manifest:
    (folder / CHECKPOINT_DIR).mkdir()
    (folder / CHECKPOINT_DIR).chmod(0o755)
    checkpoint_files = write_checkpoint(model, folder / CHECKPOINT_DIR, tokenizer)
    quantized = precision in QUANTIZED   # exported in float32, then quantized by onnxruntime's tools (or the GGUF's)
    quantization, records = {}, {}
    steps = ((export_segment, SEGMENT_FILE), (export_decode, DECODE_FILE), (export_chunk, CHUNK_FILE))
    for export, file in steps:
        target = folder / (f".float32-{file}" if quantized else file)
        export(model, target, "fp32" if quantized else precision, opset,
               **({"fused": fused} if export is export_segment else {}))   # decode/chunk: masked cache attention
        if weights is not None:
            records[file] = gguf_graph(target, folder / file, weights)
            quantization = gguf_record(weights, records)
        elif quantized:
            quantization = quantize_graph(target, folder / file, precision)
        if quantized:
            for name in graph_files(target):
                (folder / name).unlink()
    files = [name for _, file in steps for name in graph_files(folder / file)]
    cfg = model.config
    graphs = {graph: GraphEntry(file, *spec.graph_specs(graph, cfg, PRECISIONS[precision]))
              for graph, file in (("segment", SEGMENT_FILE), ("decode", DECODE_FILE), ("chunk", CHUNK_FILE))[:len(steps)]}
    names = [*files, *(f"{CHECKPOINT_DIR}/{name}" for name in checkpoint_files)]
    op_type = memory_function.OP_DELTA if cfg.update == "delta" else memory_function.OP_LINEAR
    manifest = Manifest(
        config=cfg, precision=precision, opset=opset, graphs=graphs,
        files={name: sha256_file(folder / name) for name in names},
        attention=attention.FUSED if fused else
        "Attention op" if attention.USES_ATTENTION_OP[PRECISIONS[precision]] else "decomposed",
        memory_op={"domain": memory_function.DOMAIN, "op_type": op_type, "version": memory_function.DOMAIN_VERSION},
        versions=tool_versions(), weights_sha256=weights_digest(model), quantization=quantization)
    manifest.write(folder)
    return manifest


def validation_text(tokenizer) -> torch.Tensor | None:
    """The ids of export/data/validation.txt (original prose, shipped) in the model's own tokenizer, for a
    model with a vocabulary of its own; None (random ids) for byte-level models."""
    if tokenizer is None or getattr(tokenizer, "kind", "bytes") == "bytes":
        return None
    from importlib.resources import files

    text = (files("infini_deploy.export") / "data" / VALIDATION_TEXT).read_text(encoding="utf-8")
    return torch.as_tensor(tokenizer.encode(text), dtype=torch.int64)


VALIDATION_TEXT = "validation.txt"


def _validate(model: InfiniTransformer, folder: Path, manifest: Manifest, text: torch.Tensor | None = None) -> Manifest:
    from ..runtime.quality.compare import (DECODE_TOLERANCES, TOLERANCES, agreement, check_tolerance, chunk_drift,
                                   decode_drift, drift, worst)
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.torch_runner import TorchRunner

    tolerance = TOLERANCES[manifest.precision]
    low = precision_model(model, manifest.precision)   # torch in fp16/bf16: what the precision itself costs
    with TorchRunner(model) as reference, OrtRunner(folder) as ort_runner:
        rows = drift(reference, {"onnxruntime": ort_runner}, **VALIDATION,
                     precision=TorchRunner(low).activate() if low else None, text=text)["onnxruntime"]
    check_tolerance(f"the exported segment graph ({manifest.precision}, onnxruntime CPU)", rows, tolerance)
    validation = {**VALIDATION, "partial_last": True, "backend": "onnxruntime-cpu", "worst": worst(rows),
                  "tokens": f"export/data/{VALIDATION_TEXT} ({len(text):,} ids, in order)" if text is not None
                  else "random ids", "agreement": agreement(rows)}
    tokens = model.config.segment_len + DECODE_EXTRA
    with TorchRunner(model) as prefill, TorchRunner(model, graph="decode") as reference, \
            OrtRunner(folder, graph="decode") as ort_runner:
        decode_rows = decode_drift(reference, ort_runner, prefill, tokens, VALIDATION["batch"],
                                   precision=TorchRunner(low, graph="decode").activate() if low else None, text=text)
    check_tolerance(f"the exported decode graph ({manifest.precision}, onnxruntime CPU)", decode_rows,
                    DECODE_TOLERANCES[manifest.precision])
    with TorchRunner(model) as prefill, TorchRunner(model, graph="chunk") as reference, \
            OrtRunner(folder, graph="chunk") as ort_runner:
        chunk_rows = chunk_drift(reference, ort_runner, prefill, VALIDATION["batch"],
                                 precision=TorchRunner(low, graph="chunk").activate() if low else None, text=text)
    check_tolerance(f"the exported chunk graph ({manifest.precision}, onnxruntime CPU)", chunk_rows,
                    DECODE_TOLERANCES[manifest.precision])
    validated = Manifest(**{**manifest.__dict__, "validation": {
        **validation,
        "decode": {"tokens": tokens, "batch": VALIDATION["batch"], "folds": tokens // model.config.segment_len,
                   "worst": worst(decode_rows), "agreement": agreement(decode_rows)},
        "chunk": {"pieces": [r["n"] for r in chunk_rows], "batch": VALIDATION["batch"],
                  "worst": worst(chunk_rows), "agreement": agreement(chunk_rows)}}})
    validated.write(folder)
    return validated


def owned_export(folder: Path) -> set[str] | None:
    """The files of ours in an export folder (for atomic.atomic_folder), None when it is not one of ours:
    its infini.json must be an infini-deploy manifest. Ours: the files every export has, what its manifest
    lists, and engines `infini build` named (an unlisted one only if it is a TensorRT engine: a killed build's)."""
    from .engine import is_engine_name
    from ..models.manifest import FORMAT
    from ..runtime.trt_shim import MAGIC

    try:
        manifest = parse_json((folder / MANIFEST_FILE).read_bytes(), folder / MANIFEST_FILE)
    except (OSError, InfiniError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    names = {MANIFEST_FILE, *(f"{g}{ext}" for g in (SEGMENT_FILE, DECODE_FILE, CHUNK_FILE) for ext in ("", ".data")),
             *(f"{CHECKPOINT_DIR}/{n}" for n in CHECKPOINT_FILES)}
    listed = manifest.get("files", {})
    if isinstance(listed, dict):
        names |= {n for n in listed if isinstance(n, str) and ".." not in Path(n).parts and not Path(n).is_absolute()}
    for path in folder.iterdir():
        if is_engine_name(path.name) and path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) in MAGIC:
                    names.add(path.name)
    return names


def precision_model(model: InfiniTransformer, precision: str) -> InfiniTransformer | None:
    """A copy of ``model`` in fp16/bf16 (the precision reference of runtime/compare.py); None for fp32."""
    from .graph import cast_model

    return None if precision in ("fp32", *QUANTIZED) else cast_model(model, precision)


def tool_versions() -> dict:
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "infini_deploy": __version__}
