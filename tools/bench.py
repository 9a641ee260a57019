"""`infini bench`: measurements that compare backends; figures go to stdout and JSON, never asserts."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..atomic import write_text
from ..paths import check_output_path
from .options import (THREADS, check_outputs, force_option, json_out_option, parse_count, plot_option,
                      precision_option, seed_option)


@click.group()
def bench():
    """Benchmarks (ratios measured within one run on this machine)."""


@bench.command("runners")
@click.argument("model", default="tiny")
@click.option("--tokens", "count", default="16k", show_default=True, help="Tokens per stream (16k, 1m).")
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@click.option("--threads", type=THREADS, default=2, show_default=True,
              help="torch intra-op threads and onnxruntime intra-op threads.")
@precision_option()
@click.option("--repeat", type=click.IntRange(1, 1000), default=3, show_default=True)
@seed_option()
@click.option("--profile", "profile_prefix", default=None,
              help="Also profile onnxruntime per op (its profiler's JSON goes to PREFIX*.json).")
@json_out_option()
@force_option("Replace the --json-out file if it exists.")
def runners(model, count, batch, threads, precision, repeat, seed, profile_prefix, json_out, force):
    """Tokens/s of torch (eager, fp32) and onnxruntime (CPU) on MODEL: preset, checkpoint or export folder."""
    import torch

    from ..models.manifest import is_export_dir
    from ..runtime.speed import compare_throughput

    from ..limits import check_fits

    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    if profile_prefix:
        check_output_path(Path(profile_prefix), folder=False, create=False)
    torch.set_num_threads(threads)
    count = parse_count(count)
    check_fits(batch * count * 8, f"--batch {batch} x --tokens {count:,} of token ids")
    tokens = np.random.default_rng(seed).integers(0, 256, (batch, count), dtype=np.int64)
    with _scratch() as tmp:
        export_dir = Path(model) if is_export_dir(model) else _export(model, Path(tmp) / "export", precision, seed)
        result = _measure(export_dir, tokens, threads, repeat, compare_throughput)
        if profile_prefix:
            result["onnxruntime_profile"] = _profile(export_dir, tokens, threads, profile_prefix)
    result.update(model=model, tokens=int(tokens.size), batch=batch, threads=threads, repeat=repeat)
    for name in ("torch", "onnxruntime"):
        r = result["runners"][name]
        click.echo(f"{name:>12}: {r['tokens_per_s']:>10,.0f} tokens/s (best of {repeat}; median "
                   f"{r['tokens_per_s_median']:,.0f})")
    click.echo(f"onnxruntime / torch: {result['ratio']:.2f}x ({result['precision']} export, {threads} threads, "
               f"{result['tokens']:,} tokens)")
    if json_out:
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)


def _scratch():
    """Temporary exports under the user cache: a killed run's are removed by the next one (atomic.py)."""
    from ..atomic import scratch_folder
    from .demo import cache_root

    return scratch_folder(cache_root() / "scratch")


def _profile(export_dir: Path, tokens, threads: int, prefix: str) -> dict:
    from ..runtime.speed import profile_onnxruntime

    profile = profile_onnxruntime(export_dir, tokens, threads, prefix)
    top = ", ".join(f"{op} {ms:.0f} ms" for op, ms in list(profile["by_op_type"].items())[:6])
    click.echo(f"onnxruntime per op type ({profile['total_ms']:.0f} ms of kernels): {top}")
    return profile


def _export(model: str, out: Path, precision: str, seed: int) -> Path:
    from ..export.exporter import export_model
    from ..models.checkpoint import resolve_model

    export_model(resolve_model(model, seed), out, precision)
    return out


def _measure(export_dir: Path, tokens, threads: int, repeat: int, compare) -> dict:
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.torch_runner import TorchRunner
    from .export_verify import load_export

    manifest, model = load_export(export_dir)
    runners = {"torch": TorchRunner(model), "onnxruntime": OrtRunner(export_dir, "cpu", threads)}
    try:
        figures = compare(runners, tokens, repeat)
    finally:
        for r in runners.values():
            r.deactivate()
    return {"runners": figures, "precision": manifest.precision, "config": manifest.config.to_dict(),
            "ratio": figures["onnxruntime"]["tokens_per_s"] / figures["torch"]["tokens_per_s"]}


@bench.command("long")
@click.argument("model", default="tiny")
@click.option("--tokens", "count", default="10m", show_default=True, help="Tokens to stream (1m, 10m).")
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@click.option("--threads", type=THREADS, default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@precision_option()
@click.option("--checkpoints", type=click.IntRange(1, 10000), default=10, show_default=True,
              help="Rows of state magnitude and RSS along the stream.")
@seed_option()
@json_out_option()
@force_option("Replace the --json-out file if it exists.")
def long(model, count, batch, threads, precision, checkpoints, seed, json_out, force):
    """Stream random tokens through onnxruntime (CPU) for a long time: state magnitude, tokens/s, RSS."""
    import torch

    from ..models.manifest import is_export_dir
    from ..runtime.long_stream import long_stream
    from ..runtime.measure import human_bytes
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.stream import Stream

    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    torch.set_num_threads(threads)
    tokens = parse_count(count)

    def show(row):
        click.echo(f"{row['tokens']:>12,} tokens {row['seconds']:>8.1f} s  RSS {human_bytes(row['rss_bytes'])}  "
                   f"max|z| {_fmt(row['max_abs_z'])}  max|M| {_fmt(row['max_abs_m'])}")

    with _scratch() as tmp:
        export_dir = Path(model) if is_export_dir(model) else _export(model, Path(tmp) / "export", precision, seed)
        with OrtRunner(export_dir, "cpu", threads) as runner:
            result = long_stream(Stream(runner, batch), tokens, checkpoints=checkpoints, seed=seed,
                                 on_checkpoint=show)
            result.update(precision=runner.manifest.precision, config=runner.config.to_dict())
    result.update(model=model, batch=batch, threads=threads, backend="onnxruntime-cpu")
    click.echo(f"streamed {result['tokens']:,} tokens in {result['seconds']:.1f} s: "
               f"{result['tokens_per_s']:,.0f} tokens/s; peak RSS {human_bytes(result['peak_rss_bytes'])}, RSS "
               f"start/end {human_bytes(result['rss_start_bytes'])} / {human_bytes(result['rss_end_bytes'])}; "
               f"state finite: {result['state_finite']}")
    if json_out:
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


@bench.command("feed")
@click.argument("model", required=False)
@click.option("--pieces", default="1,16,128,N", show_default=True,
              help="Piece sizes in tokens (N: the model's segment length).")
@click.option("--tokens", "count", default="2k", show_default=True, help="Tokens fed at each piece size.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
@click.option("--threads", type=THREADS, default=1, show_default=True)
@seed_option()
@json_out_option()
@force_option("Replace the --json-out file if it exists.")
def feed(model, pieces, count, backend, threads, seed, json_out, force):
    """Tokens/s of feeding a stream in small pieces, with the segment step only (each piece recomputes its
    unfinished segment) and with the chunk step (each piece costs its own tokens). MODEL: preset, checkpoint
    or export folder; default the bundled passkey model."""
    import torch

    from .demo import BUNDLED

    from ..errors import BadInputError
    from ..models.manifest import is_export_dir
    from ..runtime.speed import feed_throughput
    from ..runtime.stream import Stream

    model = model or str(BUNDLED)
    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    torch.set_num_threads(threads)
    tokens = parse_count(count)
    with _scratch() as tmp:
        if backend == "onnxruntime":
            from ..runtime.ort_runner import OrtRunner

            export_dir = Path(model) if is_export_dir(model) else _export(model, Path(tmp) / "export", "fp32", seed)
            runner, chunk = (OrtRunner(export_dir, "cpu", threads, graph=g) for g in ("segment", "chunk"))
        else:
            from ..runtime.torch_runner import TorchRunner
            from .export_verify import load_export

            net = load_export(Path(model))[1] if is_export_dir(model) else _resolve(model, seed)
            runner, chunk = TorchRunner(net), TorchRunner(net, graph="chunk")
        N = runner.config.segment_len
        try:
            sizes = [N if p.strip() == "N" else int(p) for p in pieces.split(",")]
        except ValueError:
            raise BadInputError(f"--pieces {pieces!r}: expected sizes in tokens separated by commas, e.g. 1,16,128,N")
        sizes = list(dict.fromkeys(sizes))       # "128,N" with N = 128 measures once
        if not sizes or min(sizes) < 1:
            raise BadInputError(f"--pieces {pieces!r}: every size must be at least 1")
        ids = torch.from_numpy(np.random.default_rng(seed).integers(0, min(256, runner.config.vocab_size),
                                                                    (1, tokens), dtype=np.int64))
        rows = []
        for size in sizes:
            for step, make in (("segment", lambda: Stream(runner)), ("chunk", lambda: Stream(runner, chunk_runner=chunk))):
                row = feed_throughput(make, ids, size)
                row["step"] = step
                rows.append(row)
                click.echo(f"pieces of {size:>5}: {row['tokens_per_s']:>9,.0f} tokens/s with the {step} step "
                           f"(last logits vs teacher-forced {row['logits_max_abs_vs_teacher_forced']:.1e})")
    result = {"model": model, "backend": backend, "threads": threads, "segment_len": N, "rows": rows}
    if json_out:
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)


def _resolve(model: str, seed: int):
    from ..models.checkpoint import resolve_model

    return resolve_model(model, seed)


@bench.command("memory")
@click.argument("model", default="small")
@click.option("--lengths", default="8k,32k,128k,512k,1m", show_default=True, help="Stream lengths in tokens.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True, help="Segments timed per length.")
@click.option("--threads", type=THREADS, default=1, show_default=True)
@click.option("--kv-limit", default="4g", show_default=True,
              help="Skip full-attention lengths whose fp32 KV cache would pass this many bytes (e.g. 4g, 512m).")
@click.option("--backends", default="torch,onnxruntime,full", show_default=True,
              help="Any of: torch, onnxruntime (the Infini model), full (full attention + KV cache, torch).")
@seed_option()
@json_out_option()
@plot_option()
@force_option("Replace the --json-out and --plot files if they exist.")
def memory(model, lengths, repeat, threads, kv_limit, backends, seed, json_out, plot_out, force):
    """Per-segment time and memory against stream length: the Infini model (torch, onnxruntime) and a
    full-attention model of the same shape with a KV cache, in one run."""
    import platform

    import torch

    from ..errors import BadInputError
    from ..models.checkpoint import resolve_model
    from ..runtime import memory_bench as mb
    from ..runtime.measure import human_bytes
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.stream import Stream
    from ..runtime.torch_runner import TorchRunner

    check_outputs(force, {"--json-out": json_out, "--plot": plot_out}, folders={"MODEL": Path(model)})
    torch.set_num_threads(threads)
    lengths = sorted(parse_count(x, "--lengths") for x in lengths.split(",") if x.strip())
    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = sorted(set(chosen) - {"torch", "onnxruntime", "full"})
    if unknown or not chosen:
        raise BadInputError(f"--backends: unknown {unknown}; expected torch, onnxruntime, full")
    limit = parse_count(kv_limit, "--kv-limit")
    net = resolve_model(model, seed)
    cfg = net.config
    result = {"model": model, "config": cfg.to_dict(), "threads": threads, "repeat": repeat, "lengths": lengths,
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
        with _scratch() as tmp:
            from ..export.exporter import export_model

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
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)
    if plot_out:
        mb.plot(result, plot_out, force)
        click.echo(f"plot: {plot_out}")


@bench.command("serve")
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--streams", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--tokens", "count", default="16k", show_default=True, help="Tokens per stream.")
@click.option("--request-tokens", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="Tokens per request.")
@click.option("--strategy", type=click.Choice(["oldest", "direct"]), default="oldest", show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--threads", type=THREADS, default=1, show_default=True,
              help="Intra-op threads of the runner, in the server and in process.")
@seed_option()
@json_out_option()
@force_option("Replace the --json-out file if it exists.")
def serve(export_dir, streams, count, request_tokens, strategy, max_batch, threads, seed, json_out, force):
    """Start a server on EXPORT_DIR, run concurrent remote streams, check each against a local run, stop it."""
    import platform

    from ..models.manifest import load_manifest
    from ..export.triton_repo import ServeOptions, write_repository
    from ..runtime.measure import human_bytes
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.serving.bench import serve_benchmark
    from ..runtime.serving.server import TritonServer
    from .demo import cache_root

    check_outputs(force, {"--json-out": json_out}, folders={"EXPORT_DIR": export_dir})
    tokens = parse_count(count)
    vocab = min(256, load_manifest(export_dir).config.vocab_size)
    options = ServeOptions(strategy=strategy, max_streams=max(streams, 1), max_batch=max_batch, threads=threads)
    with _scratch() as tmp:
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
        write_text(json_out, json.dumps(result, indent=2) + "\n", force=force)
    if result["errors"] or result["mismatched_replies"]:
        from ..errors import NumericalFaultError

        raise NumericalFaultError(f"{result['mismatched_replies']} replies differ from the local run; errors: "
                                  f"{'; '.join(result['errors'][:2]) or 'none'}")


from .bench_cpu import cpu as _cpu  # noqa: E402  (its own module: the command is long)

bench.add_command(_cpu)
