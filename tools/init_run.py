"""`infini init` and `infini run`."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import click
import torch

from ..errors import BadInputError
from ..models.checkpoint import init_model, resolve_model, save_checkpoint
from ..models.config import PRESETS, UPDATE_RULES, preset
from ..runtime.inputs import count_tokens, iter_tokens
from ..runtime.measure import human_bytes, stream_throughput
from ..runtime.stream import Stream
from ..runtime.torch_runner import TorchRunner

SAMPLE_TEXT = files("infini_deploy.tools") / "data" / "sample.txt"


def parse_count(text: str | None, option: str = "--tokens") -> int | None:
    """'65536', '64k' (x1024), '1m' (x1024^2) -> int. ``option`` names the flag in errors."""
    if text is None:
        return None
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise BadInputError(f"{option} {text!r}: expected a count such as 65536, 64k or 1m") from None
    if value < 1:
        raise BadInputError(f"{option} must be at least 1, got {text}")
    return value


@click.command()
@click.argument("preset_name", metavar="PRESET", type=click.Choice(list(PRESETS)))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--update", type=click.Choice(UPDATE_RULES), default="linear", show_default=True,
              help="Memory update rule: linear (Eq 8) or delta (Eq 9).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def init(preset_name, out_dir, update, seed, force):
    """Write a randomly initialised checkpoint of PRESET to OUT_DIR."""
    model = init_model(preset(preset_name, update=update), seed)
    save_checkpoint(model, out_dir, force=force)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out_dir} ({preset_name}, {update} rule, {n:,} parameters, seed {seed})")


@click.command()
@click.argument("model", default="tiny")
@click.option("--input", "input_file", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text or a .npy array of token ids [default: a bundled text].")
@click.option("--tokens", "limit", default=None, help="Stream exactly this many tokens, cycling the input (64k, 1m).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="auto: onnxruntime for an export folder (infini.json), torch otherwise; "
              "tensorrt: the folder's engine (`infini build`), on a GPU it runs on.")
@click.option("--threads", type=int, default=None, help="torch intra-op threads [default: torch's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed when MODEL is a preset.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the stream saved in this snapshot (--save-state) instead of starting empty.")
@click.option("--save-state", type=click.Path(path_type=Path), default=None,
              help="Save the stream's state here at the end (the last segment is left unfinished, to resume).")
@click.option("--force", is_flag=True, help="Replace the --save-state file if it exists.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def run(model, input_file, limit, device, backend, threads, seed, json_out, resume, save_state, force, progress):
    """Stream a file through MODEL (a checkpoint folder, a preset name or an export folder) in constant memory."""
    if threads:
        torch.set_num_threads(threads)
    limit = parse_count(limit)
    path = input_file or Path(str(SAMPLE_TEXT))
    if save_state is not None and save_state.exists() and not force:
        raise BadInputError(f"{save_state} exists; choose a new file or pass --force to replace it")
    runner, backend = make_runner(model, backend, device, threads, seed)
    tokenizer = model_tokenizer(model)
    total = limit or (count_tokens(path, tokenizer) if path.is_file() else None)
    with runner:
        stream = Stream.load(resume, runner) if resume else Stream(runner)
        result = stream_throughput(stream, iter_tokens(path, limit, tokenizer=tokenizer), total=total,
                                   progress=progress, flush=save_state is None)
        if save_state is not None:
            stream.save(save_state, force=force)
            click.echo(f"saved the state at token {stream.position:,} to {save_state}")
    cfg = runner.config
    result.update(model=model, input=str(path), backend=backend, device=device, tokenizer=tokenizer.kind,
                  threads=torch.get_num_threads(), config=cfg.to_dict())
    click.echo(f"streamed {result['tokens']:,} tokens in {result['segments']:,} segments of {cfg.segment_len} "
               f"in {result['seconds']:.2f} s: {result['tokens_per_s']:,.0f} tokens/s ({backend}, {device}, "
               f"{result['threads']} threads)")
    trace = [rss for tokens, rss in result["rss_trace"] if tokens >= 2 * cfg.segment_len]   # after warm-up
    span = f"; from token {2 * cfg.segment_len:,} on between {human_bytes(min(trace))} and " \
           f"{human_bytes(max(trace))}" if trace else ""
    click.echo(f"peak RSS {human_bytes(result['peak_rss_bytes'])}; "
               f"RSS before/after streaming {human_bytes(result['rss_before_bytes'])} / "
               f"{human_bytes(result['rss_after_bytes'])}{span}")
    click.echo(f"state {result['state_bytes']:,} bytes ({human_bytes(result['state_bytes'])}, constant at any length) "
               f"vs KV cache of a full-attention model of the same shape at {result['tokens']:,} tokens: "
               f"{human_bytes(result['kv_cache_bytes_fp32'])} fp32 / {human_bytes(result['kv_cache_bytes_fp16'])} fp16")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def model_tokenizer(model: str):
    """The tokenizer MODEL carries: an export folder's (hash-checked), a checkpoint's, or bytes for a preset."""
    from ..export.manifest import is_export_dir
    from ..models.checkpoint import resolve_tokenizer

    if not is_export_dir(model):
        return resolve_tokenizer(model)
    from ..export.exporter import CHECKPOINT_DIR
    from ..export.manifest import load_manifest
    from ..models.tokenizer import load_tokenizer

    manifest = load_manifest(model)
    for name in manifest.files:
        if name.startswith(f"{CHECKPOINT_DIR}/tokenizer"):
            manifest.verify(Path(model), name)
    return load_tokenizer(Path(model) / CHECKPOINT_DIR, manifest.config.vocab_size)


def make_runner(model: str, backend: str, device: str, threads: int | None, seed: int, graph: str = "segment"):
    """(runner, backend name): an export folder runs on onnxruntime unless --backend torch is asked for.
    ``graph``: the segment step, or the decode step (`infini generate`, `infini passkey`)."""
    from ..export.manifest import is_export_dir

    exported = is_export_dir(model)
    if backend == "auto":
        backend = "onnxruntime" if exported else "torch"
    if backend in ("onnxruntime", "tensorrt") and not exported:
        raise BadInputError(f"--backend {backend} needs an export folder (with infini.json); {model!r} is "
                            "not one: make one with `infini export`")
    if backend == "tensorrt":
        from ..runtime.trt_runner import TrtRunner

        return TrtRunner(model, graph=graph, device="cuda" if device == "cpu" else device), backend
    if backend == "onnxruntime":
        from ..runtime.ort_runner import OrtRunner

        return OrtRunner(model, provider=device, threads=threads, graph=graph), backend
    if exported:
        from .export_verify import load_export

        return TorchRunner(load_export(Path(model))[1], device=device, graph=graph), backend
    return TorchRunner(resolve_model(model, seed), device=device, graph=graph), backend
