"""`infini bench openai`: `infini serve --openai --start` in its own process and the official `openai` client:
time to first token and tokens/s per session at several concurrencies, and one long session turn by turn."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..options import check_outputs, output_options, threads_option, write_json


@click.command("openai")
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--sessions", default="1,4,16", show_default=True, help="Concurrent sessions, one run each.")
@click.option("--turns", type=click.IntRange(1, 1000), default=3, show_default=True, help="Turns per session.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Tokens each turn generates (ignore_eos: all of them).")
@click.option("--long-turns", type=click.IntRange(0, 100_000), default=1000, show_default=True,
              help="Turns of the one long session (0: none).")
@click.option("--long-max-tokens", type=click.IntRange(1, 4096), default=4, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True)
@threads_option("Intra-op threads of the server's runner [default: onnxruntime's].")
@output_options()
def bench_openai(export_dir, sessions, turns, max_tokens, long_turns, long_max_tokens, backend, threads, json_out,
                 force):
    """Serve EXPORT_DIR with the OpenAI API and measure it with the `openai` client."""
    from ...errors import BadInputError
    from ...runtime.bench.openai import openai_benchmark

    check_outputs(force, {"--json-out": json_out}, folders={"EXPORT_DIR": export_dir})
    try:
        counts = [int(x) for x in sessions.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise BadInputError(f"--sessions {sessions!r}: expected counts of at least 1 separated by commas (1,4,16)")
    model = "bench"
    command = [sys.executable, "-m", "infini_deploy.tools.entry", "serve", str(export_dir), "--openai", "--start",
               "--port", "0", "--model-name", model, "--backend", backend, "--max-streams", str(sum(counts) + 1),
               *(["--threads", str(threads)] if threads else [])]
    result = openai_benchmark(command, model, counts, turns, max_tokens, long_turns, long_max_tokens)
    result.update(export_dir=str(export_dir), backend=backend, threads=threads)
    for row in result["concurrent"]:
        click.echo(f"{row['sessions']:>3} sessions: time to first token p50 {row['ttft_ms_p50']:,.0f} ms "
                   f"(p90 {row['ttft_ms_p90']:,.0f}), per session {row['session_tokens_per_s_p50']:,.1f} tokens/s "
                   f"(p10 {row['session_tokens_per_s_p10']:,.1f}), all sessions {row['aggregate_tokens_per_s']:,.1f} "
                   f"tokens/s" + (f"; errors: {row['errors'][:2]}" if row["errors"] else ""))
    long = result["long_session"]
    if long:
        rss = long["rss_trace"]
        click.echo(f"one session, {long['turns']:,} turns ({long['session_tokens']:,} tokens): turns 2-11 "
                   f"{long['turns_2_to_11_ms_p50']:,.1f} ms, last 10 {long['last_10_turns_ms_p50']:,.1f} ms "
                   f"({long['ratio_last_to_early']:.2f}x); server RSS {rss[0]['rss_bytes'] / 2**20:,.0f} MiB at turn "
                   f"{rss[0]['turn']}, {rss[-1]['rss_bytes'] / 2**20:,.0f} MiB at turn {rss[-1]['turn']}")
    if json_out:
        write_json(json_out, result, force)
    if any(row["errors"] for row in result["concurrent"]):
        raise BadInputError(f"requests failed: {'; '.join(e for r in result['concurrent'] for e in r['errors'][:1])}")
