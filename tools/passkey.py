"""`infini passkey`: the paper's passkey retrieval test, accuracy per length and depth (runtime/quality/passkey.py)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..errors import BadInputError
from ..models.passkey import FILLERS
from ..runtime.bench.measure import human_bytes
from ..runtime.open import changed_model, model_tokenizer, open_stream
from ..runtime.quality.passkey import passkey_eval, summarise
from .options import (TEXT, backend_options, check_outputs, check_server_options, model_change_options,
                      output_options, parse_counts, parse_list, progress_option, seed_option, server_options, write_json)


def parse_depths(text: str) -> list[float]:
    def depth(x):
        d = float(x)
        if not 0 <= d <= 1:
            raise ValueError(x)
        return d
    return parse_list(text, "--depths", depth, "numbers in [0, 1] such as 0,0.5,1")


def length_label(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@click.command()
@click.argument("model")
@click.option("--lengths", default="4k,32k", show_default=True, help="Prompt lengths in tokens, e.g. 32k,128k,1m.")
@click.option("--depths", default="0,0.5,1", show_default=True, help="Needle depths: 0 = start, 1 = end.")
@click.option("--trials", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="Prompts (random keys) per cell.")
@click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Trials streamed at once, one per batch row (the same results as one by one; faster on a CPU).")
@seed_option("Seeds the keys and filler (and the init when MODEL is a preset).")
@click.option("--filler", type=click.Choice(FILLERS), default=None,
              help="fixed: the paper's filler repeated (its table's setting); varied: shuffled sentences; prose: "
                   "the --haystack text [default: prose with --haystack, else fixed].")
@click.option("--haystack", "haystack_files", multiple=True, type=TEXT,
              help="Real text as the filler, in the model's own tokenizer (repeat for several files).")
@model_change_options()
@output_options("results")
@backend_options()
@progress_option()
@server_options("With --server: the stream every trial runs on, reset before each (default: a new one).")
def passkey(model, lengths, depths, trials, batch, seed, filler, haystack_files, segment_len, gate, attend_previous,
            json_out, force, backend, device, threads, autocast, progress, server, stream_id):
    """Passkey retrieval (the paper's Table 3): accuracy per length and depth, tokens/s, peak RSS."""
    check_server_options(server, local=("backend", "device", "threads", "autocast", "batch", "segment_len", "gate",
                                        "attend_previous"), remote=("stream_id",))
    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    lengths = parse_counts(lengths, "--lengths")
    depths = parse_depths(depths)
    filler = filler or ("prose" if haystack_files else "fixed")
    haystack = None
    if filler == "prose" or haystack_files:
        from ..models.passkey import Haystack

        if filler != "prose" or not haystack_files:
            raise BadInputError("--filler prose and --haystack FILE go together")
        haystack = Haystack.from_files(haystack_files)
    tokenizer = model_tokenizer(model)
    if server is not None:
        stream, backend, device = _remote_stream(model, server, stream_id)
        label = f"the stream {stream.stream_id} served at {server}"
    else:
        net = changed_model(model, backend, seed, segment_len, gate, attend_previous)
        stream, backend = open_stream(model, backend, device, threads, seed, autocast, batch, net)
        label = getattr(stream, "label", None) or getattr(stream.runner, "label", backend)
    results = passkey_eval(stream, lengths, depths, trials, seed, filler, progress=progress,
                           on_result=_echo_trial if progress else None, tokenizer=tokenizer, haystack=haystack)
    rows = summarise(results)
    cfg = stream.config
    where = label if server is not None else f"{label} on {device}, {torch.get_num_threads()} threads"
    click.echo(f"passkey retrieval: {model} ({cfg.update} rule, segment {cfg.segment_len}), {trials} trial(s) "
               f"per cell, {filler} filler{f' ({haystack.name})' if haystack else ''}, {where}; accuracy %")
    click.echo(format_table(rows, depths))
    if json_out:
        write_json(json_out, {"model": model, "backend": backend, "runner": label, "device": device,
                              "server": server, "batch": batch, "threads": torch.get_num_threads(),
                              "config": cfg.to_dict(), "seed": seed, "filler": filler,
                              "haystack": [str(f) for f in haystack_files], "summary": rows, "trials": results}, force)


def _remote_stream(model: str, server: str, stream_id: int | None):
    """The served stream the trials run on, with the export MODEL's config (the model the server runs)."""
    from ..models.manifest import is_export_dir, load_manifest
    from ..runtime.serving.remote import RemoteStream

    if not is_export_dir(model):
        raise BadInputError(f"with --server, MODEL names the export the server runs (its tokenizer and config); "
                            f"{model} is not an export folder")
    stream = RemoteStream(server, stream_id=stream_id)   # a bad address is refused here, before any wait
    stream.config = load_manifest(model).config
    stream.open()                                         # a server that cannot be reached fails here, at once
    return stream, "server", "server"


def _echo_trial(r: dict) -> None:
    click.echo(f"{length_label(r['length'])} depth {r['depth']:g}: key {r['key']}, got {r['generated']!r} "
               f"({r['tokens_per_s']:,.0f} tokens/s)", err=True)


def format_table(rows: list[dict], depths: list[float]) -> str:
    head = ["length", *(f"depth {d:g}" for d in depths), "tokens/s", "peak RSS"]
    body = [[length_label(r["length"]), *(f"{r['accuracy'][d]:.0f}" for d in depths),
             f"{r['tokens_per_s']:,.0f}", human_bytes(r["peak_rss_bytes"])] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])
