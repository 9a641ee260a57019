"""`infini init` and `infini run`."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import click
import torch

from ..atomic import write_text
from ..errors import BadInputError
from ..models.checkpoint import init_model, resolve_model, save_checkpoint
from ..models.config import PRESETS, UPDATE_RULES, preset
from ..runtime.inputs import count_tokens, iter_tokens
from ..runtime.measure import human_bytes, stream_throughput
from ..runtime.stream import Stream
from ..runtime.torch_runner import TorchRunner
from .options import (TEXT_OR_IDS, check_outputs, device_option, json_out_option, parse_count, seed_option,
                      threads_option)

SAMPLE_TEXT = files("infini_deploy.tools") / "data" / "sample.txt"


@click.command()
@click.argument("preset_name", metavar="PRESET", type=click.Choice(list(PRESETS)))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--update", type=click.Choice(UPDATE_RULES), default="linear", show_default=True,
              help="Memory update rule: linear (Eq 8) or delta (Eq 9).")
@seed_option()
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is a checkpoint of ours.")
def init(preset_name, out_dir, update, seed, force):
    """Write a randomly initialised checkpoint of PRESET to OUT_DIR."""
    model = init_model(preset(preset_name, update=update), seed)
    save_checkpoint(model, out_dir, force=force)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out_dir} ({preset_name}, {update} rule, {n:,} parameters, seed {seed})")


@click.command()
@click.argument("model", default="tiny")
@click.option("--input", "input_file", type=TEXT_OR_IDS, default=None,
              help="UTF-8 text or a .npy array of token ids [default: a bundled text].")
@click.option("--tokens", "limit", default=None, help="Stream exactly this many tokens, cycling the input (64k, 1m).")
@device_option()
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="auto: onnxruntime for an export folder (infini.json), torch otherwise; "
              "tensorrt: the folder's engine (`infini build`), on a GPU it runs on.")
@click.option("--autocast", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True,
              help="torch backend: bf16 autocast of the weights' matmuls (the state stays float32). auto: bf16 on a "
                   "CPU with native bf16 (AMX or AVX-512 BF16) for models at least 256 wide, the fastest CPU path "
                   "measured (docs/cpu.md); off: float32.")
@threads_option("torch intra-op threads [default: torch's].")
@seed_option("Seed when MODEL is a preset.")
@json_out_option()
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the stream saved in this snapshot (--save-state) instead of starting empty.")
@click.option("--save-state", type=click.Path(path_type=Path), default=None,
              help="Save the stream's state here at the end (the last segment is left unfinished, to resume).")
@click.option("--force", is_flag=True, help="Replace the --save-state and --json-out files if they exist.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--server", default=None, help="Stream through the model a Triton server serves (`infini serve`), "
              "at this HTTP address (host:port); MODEL then gives only the tokenizer (the export the server runs).")
@click.option("--stream-id", type=click.IntRange(1, 2**63 - 1), default=None,
              help="With --server: the stream to continue (default: a new one).")
@click.option("--end/--no-end", "end_stream", default=True, show_default=True,
              help="With --server: end the stream afterwards (the server persists it with a --state-dir).")
def run(model, input_file, limit, device, backend, autocast, threads, seed, json_out, resume, save_state, force,
        progress, server, stream_id, end_stream):
    """Stream a file through MODEL (a checkpoint folder, a preset name or an export folder) in constant memory."""
    check_server_options(server, local=("resume", "save_state", "backend", "device", "autocast", "threads", "seed"),
                         remote=("stream_id", "end_stream"))
    if server is not None:
        return _run_remote(server, stream_id, end_stream, model, input_file, limit, json_out, force, progress)
    if threads:
        torch.set_num_threads(threads)
    limit = parse_count(limit)
    path = input_file or Path(str(SAMPLE_TEXT))
    check_outputs(force, {"--save-state": save_state, "--json-out": json_out},
                  {"--input": input_file, "--resume": resume}, {"MODEL": Path(model)})
    runner, backend = make_runner(model, backend, device, threads, seed, autocast=autocast)
    tokenizer = model_tokenizer(model)
    total = limit or count_tokens(path, tokenizer)
    with runner:
        stream = Stream.load(resume, runner) if resume else Stream(runner)
        if stream.batch != 1:
            raise BadInputError(f"--resume {resume} holds a stream of batch {stream.batch}; `infini run` streams "
                                "one input (resume it with the Python API: Stream.load)")
        result = stream_throughput(stream, iter_tokens(path, limit, tokenizer=tokenizer), total=total,
                                   progress=progress, flush=save_state is None)
        if save_state is not None:
            stream.save(save_state, force=force)
            click.echo(f"saved the state at token {stream.position:,} to {save_state}")
    cfg = runner.config
    result.update(model=model, input=str(path), backend=backend, autocast=getattr(runner, "autocast", None) or "off",
                  device=device, tokenizer=tokenizer.kind,
                  threads=torch.get_num_threads(), config=cfg.to_dict())
    click.echo(f"streamed {result['tokens']:,} tokens in {result['segments']:,} segments of {cfg.segment_len} "
               f"in {result['seconds']:.2f} s: {result['tokens_per_s']:,.0f} tokens/s ({getattr(runner, 'label', backend)}, {device}, "
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
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)


def _run_remote(server, stream_id, end_stream, model, input_file, limit, json_out, force, progress):
    import time

    from ..runtime.serving.remote import RemoteStream

    stream = RemoteStream(server, stream_id=stream_id)    # a bad address is refused here, before any wait
    limit = parse_count(limit)
    path = input_file or Path(str(SAMPLE_TEXT))
    check_outputs(force, {"--json-out": json_out}, {"--input": input_file})
    tokenizer = model_tokenizer(model)
    start_position = stream.open()                        # a server that cannot be reached fails here, at once
    total = limit or count_tokens(path, tokenizer)
    began = time.perf_counter()
    stream.feed_chunks(iter_tokens(path, limit, tokenizer=tokenizer), keep="none", total=total, progress=progress)
    seconds = time.perf_counter() - began
    tokens = stream.position - start_position
    persisted = stream.end() if end_stream else stream.persisted
    result = {"server": server, "stream_id": stream.stream_id, "input": str(path), "tokenizer": tokenizer.kind,
              "tokens": tokens,
              "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
              "position": stream.position, "persisted": persisted}
    click.echo(f"streamed {tokens:,} tokens through {server} (stream {stream.stream_id}, now at token "
               f"{stream.position:,}) in {seconds:.2f} s: {result['tokens_per_s']:,.0f} tokens/s; "
               + (f"persisted at token {persisted:,}" if persisted >= 0 else _not_persisted(stream)))
    if json_out:
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)


def _not_persisted(stream) -> str:
    """Why a remote stream is not on disk, as its server says (its state directory and --persist)."""
    from ..runtime.serving.remote import ServerError

    try:
        state_dir, persist = stream.server_persistence()
    except ServerError:
        return "not persisted (the server did not say whether it has a --state-dir)"
    if not state_dir:
        return "not persisted: the server has no --state-dir (its streams live in its memory only)"
    return (f"not persisted yet: the server persists it to {state_dir} at END, idle expiry or shutdown "
            f"(--persist {persist})")


def check_server_options(server, local: tuple[str, ...], remote: tuple[str, ...]) -> None:
    """With --server the server's model runs: the ``local`` runner's options given on the command line are
    refused, as are the ``remote`` stream's options without --server (before anything is read or sent)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}

    def given(names):
        return ["/".join(params[n].opts + params[n].secondary_opts) for n in names
                if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]

    if server is not None and given(local):
        raise BadInputError(f"{', '.join(given(local))} cannot go with --server: the server's model runs, with the "
                            "server's settings (`infini serve`)")
    if server is None and given(remote):
        raise BadInputError(f"{', '.join(given(remote))} needs --server (a stream on a Triton server)")


def model_tokenizer(model: str):
    """The tokenizer MODEL carries: an export folder's (hash-checked), a checkpoint's, or bytes for a preset."""
    from ..models.manifest import is_export_dir
    from ..models.checkpoint import resolve_tokenizer

    if not is_export_dir(model):
        return resolve_tokenizer(model)
    from ..models.manifest import CHECKPOINT_DIR
    from ..models.manifest import load_manifest
    from ..models.tokenizer import load_tokenizer

    manifest = load_manifest(model)
    for name in manifest.files:
        if name.startswith(f"{CHECKPOINT_DIR}/tokenizer"):
            manifest.verify(Path(model), name)
    return load_tokenizer(Path(model) / CHECKPOINT_DIR, manifest.config.vocab_size)


def make_runner(model: str, backend: str, device: str, threads: int | None, seed: int, graph: str = "segment",
                autocast: str = "off"):
    """(runner, backend name): an export folder runs on onnxruntime unless --backend torch is asked for.
    ``graph``: the segment step, or the decode step (`infini generate`, `infini passkey`).
    ``autocast`` (torch): "bf16", "off", or "auto" (:func:`fastest_autocast`)."""
    from ..models.manifest import is_export_dir

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

        net = load_export(Path(model))[1]
    else:
        net = resolve_model(model, seed)
    if autocast == "auto":
        autocast = fastest_autocast(net, device)
    return TorchRunner(net, device=device, graph=graph, autocast=None if autocast == "off" else autocast), backend


AUTOCAST_MIN_WIDTH = 256   # measured: tiny (64 wide) is 1.8x slower in bf16, small (256) 1.6-3x and SmolLM2 2.1x faster


def fastest_autocast(net, device: str) -> str:
    """bf16 on a CPU with native bf16 matmuls for a float32 model at least AUTOCAST_MIN_WIDTH wide, else off."""
    if str(device) != "cpu" or next(net.parameters()).dtype != torch.float32 or net.config.d_model < AUTOCAST_MIN_WIDTH:
        return "off"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "off"
    return "bf16" if " amx_bf16" in flags or " avx512_bf16" in flags else "off"
