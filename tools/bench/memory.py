"""`infini bench memory`: per-segment time and memory from 8K to 1M tokens, Infini against full attention."""

from __future__ import annotations

from pathlib import Path

import click

from ...export.cache import scratch
from ..options import (check_outputs, output_options, parse_count, plot_option,
                       seed_option, threads_option, write_json)


@click.command("memory")
@click.argument("model", default="small")
@click.option("--lengths", default="8k,32k,128k,512k,1m", show_default=True, help="Stream lengths in tokens.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True, help="Segments timed per length.")
@threads_option()
@click.option("--kv-limit", default="4g", show_default=True,
              help="Skip full-attention lengths whose fp32 KV cache would pass this many bytes (e.g. 4g, 512m).")
@click.option("--backends", default="torch,onnxruntime,full", show_default=True,
              help="Any of: torch, onnxruntime (the Infini model), full (full attention + KV cache, torch).")
@seed_option()
@output_options()
@plot_option()
def bench_memory(model, lengths, repeat, threads, kv_limit, backends, seed, json_out, force, plot_out):
    """Per-segment time and memory against stream length: the Infini model (torch, onnxruntime) and a
    full-attention model of the same shape with a KV cache, in one run."""
    import platform

    import torch

    from ...errors import BadInputError
    from ...models.checkpoint import resolve_model
    from ...runtime.bench import memory as mb
    from ...runtime.bench.measure import human_bytes
    from ...runtime.ort_runner import OrtRunner
    from ...runtime.stream import Stream
    from ...runtime.torch_runner import TorchRunner

    check_outputs(force, {"--json-out": json_out, "--plot": plot_out}, folders={"MODEL": Path(model)})
    if threads:
        torch.set_num_threads(threads)
    lengths = sorted(parse_count(x, "--lengths") for x in lengths.split(",") if x.strip())
    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = sorted(set(chosen) - {"torch", "onnxruntime", "full"})
    if unknown or not chosen:
        raise BadInputError(f"--backends: unknown {unknown}; expected torch, onnxruntime, full")
    limit = parse_count(kv_limit, "--kv-limit")
    net = resolve_model(model, seed)
    cfg = net.config
    result = {"model": model, "config": cfg.to_dict(), "threads": torch.get_num_threads(), "repeat": repeat, "lengths": lengths,
              "kv_limit_bytes": limit, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}

    def show(name):
        def on_row(r):
            if "skipped" in r:
                click.echo(f"{name:>22} {r['tokens']:>9,}: skipped ({r['skipped']})")
                return
            mem = r.get("state_bytes", r.get("kv_cache_bytes"))
            click.echo(f"{name:>22} {r['tokens']:>9,}: {r['ms_per_segment']:8.1f} ms/segment, "
                       f"{'state' if 'state_bytes' in r else 'KV cache'} {human_bytes(mem)}, "
                       f"RSS {human_bytes(r['rss_bytes'])}")
        return on_row

    if "torch" in chosen:
        result["infini_torch"] = mb.infini_rows(Stream(TorchRunner(net)), lengths, repeat, seed, show("Infini torch"))
    if "onnxruntime" in chosen:
        with scratch() as tmp:
            from ...export.exporter import export_model

            # not validated here: a timing run; `infini export` checks the graphs against torch
            export_dir = Path(tmp) / "export"
            export_model(net, export_dir, "fp32", validate=False)
            with OrtRunner(export_dir, "cpu", threads) as runner:
                result["infini_onnxruntime"] = mb.infini_rows(Stream(runner), lengths, repeat, seed,
                                                              show("Infini onnxruntime"))
    if "full" in chosen:
        result["full_attention_torch"] = mb.baseline_rows(net, lengths, repeat, limit, seed,
                                                          show("full attention torch"))
    if json_out:
        write_json(json_out, result, force)
    if plot_out:
        mb.plot(result, plot_out, force)
        click.echo(f"plot: {plot_out}")
