"""`infini bench long`: a long stream through onnxruntime: tokens/s, RSS at start and end, state magnitude."""

from __future__ import annotations

from pathlib import Path

import click

from ...export.cache import scratch
from ..options import (check_outputs, output_options, parse_count, precision_option, seed_option, threads_option,
                       tokens_option, write_json)
from . import export_to


@click.command("long")
@click.argument("model", default="tiny")
@tokens_option("10m", "Tokens to stream (1m, 10m).")
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@threads_option("onnxruntime intra-op threads [default: its own].")
@precision_option()
@click.option("--checkpoints", type=click.IntRange(1, 10000), default=10, show_default=True,
              help="Rows of state magnitude and RSS along the stream.")
@seed_option()
@output_options()
def bench_long(model, count, batch, threads, precision, checkpoints, seed, json_out, force):
    """Stream random tokens through onnxruntime (CPU) for a long time: state magnitude, tokens/s, RSS."""
    import torch

    from ...models.manifest import is_export_dir
    from ...runtime.bench.long import long_stream
    from ...runtime.bench.measure import human_bytes
    from ...runtime.ort_runner import OrtRunner
    from ...runtime.stream import Stream

    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    if threads:
        torch.set_num_threads(threads)
    tokens = parse_count(count)

    def show(row):
        click.echo(f"{row['tokens']:>12,} tokens {row['seconds']:>8.1f} s  RSS {human_bytes(row['rss_bytes'])}  "
                   f"max|z| {_fmt(row['max_abs_z'])}  max|M| {_fmt(row['max_abs_m'])}")

    with scratch() as tmp:
        export_dir = Path(model) if is_export_dir(model) else export_to(model, Path(tmp) / "export", precision, seed)
        with OrtRunner(export_dir, "cpu", threads) as runner:
            result = long_stream(Stream(runner, batch), tokens, checkpoints=checkpoints, seed=seed,
                                 on_checkpoint=show)
            result.update(precision=runner.manifest.precision, config=runner.config.to_dict())
    result.update(model=model, batch=batch, threads=torch.get_num_threads(), backend="onnxruntime-cpu")
    click.echo(f"streamed {result['tokens']:,} tokens in {result['seconds']:.1f} s: "
               f"{result['tokens_per_s']:,.0f} tokens/s; peak RSS {human_bytes(result['peak_rss_bytes'])}, RSS "
               f"start/end {human_bytes(result['rss_start_bytes'])} / {human_bytes(result['rss_end_bytes'])}; "
               f"state finite: {result['state_finite']}")
    if json_out:
        write_json(json_out, result, force)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
