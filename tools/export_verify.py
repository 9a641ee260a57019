"""`infini export` and `infini verify`: wiring only; the work is in export/ and runtime/compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..atomic import write_text
from ..errors import MissingBackendError
from ..export.graph import DEFAULT_OPSET
from ..models.checkpoint import resolve_model, resolve_tokenizer
from ..runtime.measure import human_bytes, peak_rss_bytes
from .options import TEXT_OR_IDS, check_outputs, force_option, json_out_option, precision_option, seed_option, threads_option


@click.command("export")
@click.argument("model")
@click.argument("out_dir", type=click.Path(path_type=Path))
@precision_option("Weights and activations; the state stays float32.")
@click.option("--opset", type=click.IntRange(1, 100), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset (fp16/bf16: >= 23).")
@click.option("--fused", is_flag=True,
              help="Local attention as onnxruntime's GroupQueryAttention (segment graph): faster on onnxruntime, "
                   "not buildable by TensorRT. fp32, int8, int4.")
@seed_option("Seed when MODEL is a preset.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is an export folder of ours.")
def export(model, out_dir, precision, opset, fused, seed, force):
    """Export MODEL (a checkpoint folder or a preset name) to OUT_DIR: segment.onnx + decode.onnx + infini.json,
    validated."""
    from ..export.exporter import export_model

    manifest = export_model(resolve_model(model, seed), out_dir, precision, opset, force=force,
                            tokenizer=resolve_tokenizer(model), fused=fused)
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
    else:   # attend_previous: the segment step carries the previous segment's keys and values; no decode step yet
        click.echo("segment.onnx also carries the previous segment's keys and values (attend_previous): no decode or "
                   "chunk graph; generation runs the segment graph (runtime/past_stream.py)")
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


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--segments", type=click.IntRange(1, 10**9), default=16, show_default=True)
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@seed_option("Seed of the random tokens.")
@click.option("--text", "text_file", type=TEXT_OR_IDS, default=None,
              help="Stream this text (the export's tokenizer) instead of random ids [default for a model with its "
                   "own vocabulary: the validation text export/data/validation.txt].")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="Print every k-th segment (and the last) [default: about 20 rows].")
@threads_option("Threads of every backend.")
@json_out_option("Write every segment's figures.")
@force_option("Replace the --json-out file if it exists.")
def verify(export_dir, segments, batch, seed, text_file, every, threads, json_out, force):
    """Stream the same tokens through torch and every available exported backend; report drift. Random ids, or
    text for a model with its own vocabulary (where a quantized model's top-1 agreement means something)."""
    import torch

    from ..runtime.compare import TOLERANCES, agreement, check_tolerance, drift, format_table, summary_rows, worst
    from ..runtime.torch_runner import TorchRunner

    check_outputs(force, {"--json-out": json_out}, folders={"EXPORT_DIR": export_dir})
    if threads:
        torch.set_num_threads(threads)
    from ..export.exporter import precision_model

    manifest, model = load_export(export_dir)
    runners = exported_runners(export_dir, threads)
    text, source = _verify_text(export_dir, text_file)
    low = precision_model(model, manifest.precision)   # torch in the export's precision, for its tolerance
    with TorchRunner(model) as reference:
        for r in runners.values():
            r.activate()
        try:
            rows = drift(reference, runners, segments, batch, seed,
                         precision=TorchRunner(low).activate() if low else None, text=text)
        finally:
            for r in runners.values():
                r.deactivate()
    tolerance = TOLERANCES[manifest.precision]
    click.echo(f"{export_dir}: {manifest.precision}, {segments} segments of up to {manifest.config.segment_len} "
               f"tokens (last partial), batch {batch}, {source}; differences against torch fp32")
    for name, backend_rows in rows.items():
        click.echo(format_table(name, summary_rows(backend_rows, every)))
    if json_out:
        write_text(json_out, json.dumps({
            "export_dir": str(export_dir), "precision": manifest.precision, "segments": segments, "batch": batch,
            "seed": seed, "tokens": source, "tolerance": tolerance.__dict__,
            "backends": {n: {"worst": worst(r), "rows": r} for n, r in rows.items()}}, indent=1) + "\n", force=force)
    for name, backend_rows in rows.items():
        check_tolerance(name, backend_rows, tolerance)
    if tolerance.cosine_min is not None:
        figures = "; ".join(f"{n}: logits cosine {a['logits_cosine']:.4f}, top-1 {a['top1_agreement']:.1%}"
                            for n, a in ((n, agreement(r)) for n, r in rows.items()))
        click.echo(f"all within the {manifest.precision} tolerance (over every position: mean logits cosine >= "
                   f"{tolerance.cosine_min:g}, top-1 agreement >= {tolerance.top1_min:.0%}; state "
                   f"{tolerance.state_rel:g} relative): {figures}")
        return
    extra = " or 4 x torch's own error in this precision" if low else ""
    click.echo(f"all within the {manifest.precision} tolerance (logits {tolerance.logits_rel:g} x max(1, |logits|)"
               f"{extra}; state {tolerance.state_rel:g} relative{extra})")


def _verify_text(export_dir: Path, text_file: Path | None):
    """(ids or None, what they are): --text, else the validation text for a model with its own vocabulary."""
    import numpy as np
    import torch

    from ..export.exporter import VALIDATION_TEXT, validation_text
    from .init_run import model_tokenizer

    tokenizer = model_tokenizer(str(export_dir))
    if text_file is None:
        ids = validation_text(tokenizer)
        return ids, (f"export/data/{VALIDATION_TEXT}" if ids is not None else "random ids")
    from ..runtime.inputs import iter_tokens

    ids = torch.from_numpy(np.concatenate(list(iter_tokens(text_file, tokenizer=tokenizer))))
    return ids, f"{text_file} ({len(ids):,} ids)"


def load_export(export_dir: Path):
    """The manifest and the torch model rebuilt from the checkpoint stored in the export (hash-checked)."""
    from ..errors import IncompatibleArtifactError
    from ..models.manifest import CHECKPOINT_DIR
    from ..models.manifest import load_manifest
    from ..models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, weights_digest

    manifest = load_manifest(export_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        manifest.verify(export_dir, f"{CHECKPOINT_DIR}/{name}")
    model = load_checkpoint(Path(export_dir) / CHECKPOINT_DIR)
    if manifest.weights_sha256 and weights_digest(model) != manifest.weights_sha256:
        raise IncompatibleArtifactError(f"{export_dir}/{CHECKPOINT_DIR}/{WEIGHTS_FILE} holds other weights than the "
                                        "export's graphs (its tensors' sha256 differs from infini.json's "
                                        "weights_sha256): a checkpoint from another export put in its place?")
    return manifest, model


def exported_runners(export_dir: Path, threads: int | None = None) -> dict:
    """Every backend that can run this export here: onnxruntime CPU, and CUDA and TensorRT when available
    (TensorRT when the folder has an engine and a GPU it runs on is there)."""
    from ..models.manifest import load_manifest
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.trt_runner import TrtRunner

    runners = {"onnxruntime-cpu": OrtRunner(export_dir, "cpu", threads)}
    try:
        runners["onnxruntime-cuda"] = OrtRunner(export_dir, "cuda", threads)
    except MissingBackendError:
        pass
    if load_manifest(export_dir).tensorrt:
        try:
            runners["tensorrt"] = TrtRunner(export_dir)
        except MissingBackendError:
            pass
    return runners
