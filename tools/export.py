"""`infini export`: wiring only; the work is in export/ (the graphs, their validation against torch)."""

from __future__ import annotations

from pathlib import Path

import click

from ..export.graph import DEFAULT_OPSET
from ..models.checkpoint import resolve_tokenizer
from ..runtime.open import load_model
from ..runtime.bench.measure import human_bytes, peak_rss_bytes
from .options import precision_option, seed_option


@click.command("export")
@click.argument("model")
@click.argument("out_dir", type=click.Path(path_type=Path))
@precision_option("Weights and activations; the state stays float32.")
@click.option("--opset", type=click.IntRange(1, 100), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset (fp16/bf16: >= 23).")
@click.option("--fused", is_flag=True,
              help="Local attention as onnxruntime's GroupQueryAttention (segment graph): faster on onnxruntime, "
                   "not buildable by TensorRT. fp32, int8, int8w, int4, gguf.")
@click.option("--gguf", "gguf", type=click.Path(path_type=Path), default=None, metavar="FILE.gguf",
              help="With --precision gguf: the GGUF file MODEL was converted from; its Q4_0/Q4_1/Q8_0 blocks become "
                   "the weights, unchanged (docs/quantization.md).")
@seed_option("Seed when MODEL is a preset.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is an export folder of ours.")
def export(model, out_dir, precision, opset, fused, gguf, seed, force):
    """Export MODEL (a checkpoint folder or a preset name) to OUT_DIR: segment.onnx + decode.onnx + infini.json,
    validated."""
    from ..export.exporter import export_model

    manifest = export_model(load_model(model, seed), out_dir, precision, opset, force=force,
                            tokenizer=resolve_tokenizer(model), fused=fused, gguf=gguf)
    quantized = f", {manifest.quantization['weights']} weights" if manifest.quantization else ""
    click.echo(f"wrote {out_dir} ({precision}{quantized}, opset {opset}, local attention: {manifest.attention}, "
               f"memory node {manifest.memory_op['domain']}::{manifest.memory_op['op_type']})")
    click.echo(f"validated against torch on onnxruntime (batch {manifest.validation['batch']}, "
               f"{manifest.validation['segments']} segments, last partial): "
               f"{_figures(manifest.validation, quantized)}")
    if "decode" in manifest.validation:
        dec = manifest.validation["decode"]
        click.echo(f"validated decode.onnx against torch ({dec['tokens']} tokens one by one, {dec['folds']} fold(s)): "
                   f"{_figures(dec, quantized)}")
        chunk = manifest.validation["chunk"]
        click.echo(f"validated chunk.onnx against torch (pieces of {', '.join(map(str, chunk['pieces']))} "
                   f"tokens): {_figures(chunk, quantized)}")
    sizes = ", ".join(f"{name} {human_bytes((Path(out_dir) / name).stat().st_size)}" for name in manifest.files
                      if name.endswith((".onnx", ".onnx.data")))
    click.echo(f"export {manifest.validation['export_s']:.1f} s, validation {manifest.validation['validate_s']:.1f} s; "
               f"{sizes}; peak RSS {human_bytes(peak_rss_bytes())}")


def _figures(record: dict, quantized) -> str:
    worst = record["worst"]
    text = f"logits max abs {worst['logits_max']:.2e}, state relative {worst['state_rel']:.2e}"
    if quantized:   # what a quantized graph is gated on (runtime/compare.py): over every position
        a = record["agreement"]
        text += f"; logits cosine {a['logits_cosine']:.4f}, top-1 agreement {a['top1_agreement']:.1%}"
    return text
