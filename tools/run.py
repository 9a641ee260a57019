"""`infini run`: stream a text through MODEL (or through a stream a server holds) in constant memory."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import click
import torch

from ..errors import BadInputError
from ..runtime.bench.measure import human_bytes, stream_throughput
from ..runtime.inputs import count_tokens, iter_tokens
from ..runtime.open import model_tokenizer, open_runner
from ..runtime.stream import Stream
from .options import (TEXT_OR_IDS, backend_options, check_outputs, check_server_options, output_options,
                      parse_count, progress_option, seed_option, server_options, tokens_option, write_json)

SAMPLE_TEXT = files("infini_deploy.tools") / "data" / "sample.txt"


@click.command()
@click.argument("model", default="tiny")
@click.option("--text", "text_file", type=TEXT_OR_IDS, default=None,
              help="UTF-8 text or a .npy array of token ids [default: a bundled text].")
@tokens_option(help_text="Stream exactly this many tokens, cycling the text (64k, 1m).")
@backend_options()
@seed_option("Seed when MODEL is a preset.")
@click.option("--load-state", type=click.Path(path_type=Path), default=None,
              help="Continue the stream saved in this snapshot (--save-state) instead of starting empty.")
@click.option("--save-state", type=click.Path(path_type=Path), default=None,
              help="Save the stream's state here at the end (the last segment is left unfinished, to resume).")
@output_options()
@progress_option()
@server_options()
@click.option("--end/--no-end", "end_stream", default=True, show_default=True,
              help="With --server: end the stream afterwards (the server persists it with a --state-dir).")
def run(model, text_file, count, backend, device, threads, autocast, seed, load_state, save_state, json_out, force,
        progress, server, stream_id, end_stream):
    """Stream a file through MODEL (a checkpoint folder, a preset name or an export folder) in constant memory."""
    check_server_options(server, local=("load_state", "save_state", "backend", "device", "autocast", "threads",
                                        "seed"), remote=("stream_id", "end_stream"))
    if server is not None:
        return _run_remote(server, stream_id, end_stream, model, text_file, count, json_out, force, progress)
    limit = parse_count(count)
    path = text_file or Path(str(SAMPLE_TEXT))
    check_outputs(force, {"--save-state": save_state, "--json-out": json_out},
                  {"--text": text_file, "--load-state": load_state}, {"MODEL": Path(model)})
    runner, backend = open_runner(model, backend, "segment", device, threads, seed, autocast)
    tokenizer = model_tokenizer(model)
    total = limit or count_tokens(path, tokenizer)
    with runner:
        stream = Stream.load(load_state, runner) if load_state else Stream(runner)
        if stream.batch != 1:
            raise BadInputError(f"--load-state {load_state} holds a stream of batch {stream.batch}; `infini run` "
                                "streams one input (resume it with the Python API: Stream.load)")
        result = stream_throughput(stream, iter_tokens(path, limit, tokenizer=tokenizer), total=total,
                                   progress=progress, flush=save_state is None)
        if save_state is not None:
            stream.save(save_state, force=force)
            click.echo(f"saved the state at token {stream.position:,} to {save_state}")
    cfg = runner.config
    result.update(model=model, text=str(path), backend=backend, autocast=getattr(runner, "autocast", None) or "off",
                  device=device, tokenizer=tokenizer.kind, threads=torch.get_num_threads(), config=cfg.to_dict())
    click.echo(f"streamed {result['tokens']:,} tokens in {result['segments']:,} segments of {cfg.segment_len} "
               f"in {result['seconds']:.2f} s: {result['tokens_per_s']:,.0f} tokens/s "
               f"({getattr(runner, 'label', backend)}, {device}, {result['threads']} threads)")
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
        write_json(json_out, result, force)


def _run_remote(server, stream_id, end_stream, model, text_file, count, json_out, force, progress):
    import time

    from ..runtime.serving.remote import RemoteStream

    stream = RemoteStream(server, stream_id=stream_id)    # a bad address is refused here, before any wait
    limit = parse_count(count)
    path = text_file or Path(str(SAMPLE_TEXT))
    check_outputs(force, {"--json-out": json_out}, {"--text": text_file})
    tokenizer = model_tokenizer(model)
    start_position = stream.open()                        # a server that cannot be reached fails here, at once
    total = limit or count_tokens(path, tokenizer)
    began = time.perf_counter()
    stream.feed_chunks(iter_tokens(path, limit, tokenizer=tokenizer), keep="none", total=total, progress=progress)
    seconds = time.perf_counter() - began
    tokens = stream.position - start_position
    persisted = stream.end() if end_stream else stream.persisted
    result = {"server": server, "stream_id": stream.stream_id, "text": str(path), "tokenizer": tokenizer.kind,
              "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
              "position": stream.position, "persisted": persisted}
    click.echo(f"streamed {tokens:,} tokens through {server} (stream {stream.stream_id}, now at token "
               f"{stream.position:,}) in {seconds:.2f} s: {result['tokens_per_s']:,.0f} tokens/s; "
               + (f"persisted at token {persisted:,}" if persisted >= 0 else _not_persisted(stream)))
    if json_out:
        write_json(json_out, result, force)


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


