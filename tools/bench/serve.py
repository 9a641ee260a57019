"""`infini bench serve`: a real server, concurrent remote streams checked against the in-process batched run."""

from __future__ import annotations

from pathlib import Path

import click

from ...export.cache import scratch
from ..options import (check_outputs, output_options, parse_count, seed_option, threads_option, tokens_option,
                       write_json)


@click.command("serve")
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--streams", type=click.IntRange(1, 4096), default=16, show_default=True)
@tokens_option("16k", "Tokens per stream.")
@click.option("--request-tokens", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="Tokens per request.")
@click.option("--strategy", type=click.Choice(["oldest", "direct"]), default="oldest", show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True)
@threads_option("Intra-op threads of the runner, in the server and in process [default: onnxruntime's].")
@seed_option()
@output_options()
def bench_serve(export_dir, streams, count, request_tokens, strategy, max_batch, threads, seed, json_out, force):
    """Start a server on EXPORT_DIR, run concurrent remote streams, check each against a local run, stop it."""
    import platform

    from ...models.manifest import load_manifest
    from ...export.triton_repo import ServeOptions, write_repository
    from ...runtime.bench.measure import human_bytes
    from ...runtime.ort_runner import OrtRunner
    from ...runtime.bench.serve import serve_benchmark
    from ...runtime.serving.server import TritonServer
    from ...paths import cache_root

    check_outputs(force, {"--json-out": json_out}, folders={"EXPORT_DIR": export_dir})
    tokens = parse_count(count)
    vocab = min(256, load_manifest(export_dir).config.vocab_size)
    options = ServeOptions(strategy=strategy, max_streams=max(streams, 1), max_batch=max_batch, threads=threads or 0)
    with scratch() as tmp:
        repo = write_repository(export_dir, Path(tmp) / "repo", options)
        with TritonServer(repo, cache_root(), log=Path(tmp) / "server.log") as server:
            graphs = load_manifest(export_dir).graphs

            def make_runner(graph):
                return OrtRunner(export_dir, threads=threads, graph=graph) if graph in graphs else None

            result = serve_benchmark(server, make_runner, streams, tokens, request_tokens, seed, vocab)
    result.update(export_dir=str(export_dir), strategy=strategy, max_batch=max_batch, threads=threads,
                  machine=platform.processor() or platform.machine())
    s, b = result["served"], result["in_process_batched"]
    click.echo(f"{streams} streams x {tokens:,} tokens in requests of {request_tokens:,}: served "
               f"{s['tokens_per_s']:,.0f} tokens/s, in process (batched) {b['tokens_per_s']:,.0f} tokens/s: "
               f"{result['ratio']:.2f}x")
    click.echo(f"latency per request p50 {s['latency_ms_p50']:.1f} ms, p99 {s['latency_ms_p99']:.1f} ms; server RSS "
               f"{human_bytes(result['server_rss_start_bytes'])} at start, "
               + (f"{human_bytes(result['server_rss_warm_bytes'])} once every stream was served twice, "
                  if result["server_rss_warm_bytes"] else "") +
               f"{human_bytes(result['server_rss_end_bytes'])} at the end; "
               f"mismatched replies: {result['mismatched_replies']}; errors: {len(result['errors'])}")
    if json_out:
        write_json(json_out, result, force)
    if result["errors"] or result["mismatched_replies"]:
        from ...errors import NumericalFaultError

        raise NumericalFaultError(f"{result['mismatched_replies']} replies differ from the local run; errors: "
                                  f"{'; '.join(result['errors'][:2]) or 'none'}")
