"""`infini serve`: a Triton model repository from an export, and optionally the bundled server on loopback; or,
with ``--openai``, the OpenAI-compatible API over the export's streams in this process."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from ..export.triton_repo import STRATEGIES
from .options import THREADS


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--repo", type=click.Path(path_type=Path), default=None,
              help="The model repository to write (required without --openai).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="oldest", show_default=True,
              help="Sequence batcher: oldest batches requests of different streams; direct gives each a slot.")
@click.option("--max-streams", type=click.IntRange(1, 1 << 16), default=64, show_default=True,
              help="Streams one model instance holds in memory.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests of different streams served in one call.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Persist each stream's state here (at END, idle expiry, shutdown): any server sharing the "
              "folder can resume it.")
@click.option("--persist", type=click.Choice(["end", "every"]), default="end", show_default=True,
              help="every: also after each request (nothing is lost if the server is killed).")
@click.option("--idle", "idle_s", type=click.FloatRange(1, 1e7), default=3600, show_default=True,
              help="Seconds after which an idle stream is persisted and dropped from memory.")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True, help="The runner inside the served model.")
@click.option("--threads", type=THREADS, default=None, help="Intra-op threads of that runner.")
@click.option("--start", is_flag=True, help="Also start the bundled tritonserver on loopback until Ctrl-C.")
@click.option("--force", is_flag=True, help="Replace REPO if it is a repository of ours.")
@click.option("--openai", is_flag=True, help="With --start: serve the OpenAI-compatible API (/v1/chat/completions, "
              "/v1/completions, /v1/models; sessions kept as streams) on loopback, in this process, instead of Triton.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="With --openai: the loopback port (0: a free one).")
@click.option("--model-name", default=None, help="With --openai: the model id clients name [default: EXPORT_DIR's name].")
@click.pass_context
def serve(ctx, export_dir, repo, strategy, max_streams, max_batch, instances, state_dir, persist, idle_s, backend,
          threads, start, force, openai, port, model_name):
    """Write a Triton Inference Server model repository for EXPORT_DIR (and serve it with --start), or serve the
    OpenAI-compatible API over EXPORT_DIR (--openai --start)."""
    from ..export.triton_repo import ServeOptions, write_repository
    from ..runtime.serving.pool import check_state_dir

    _check_flavour(ctx, openai, start, repo)
    if openai:
        if state_dir is not None:
            check_state_dir(state_dir)
        _run_openai(export_dir, port, model_name, backend, threads, max_streams, state_dir, persist, idle_s)
        return

    options = ServeOptions(strategy, max_streams, max_batch, instances, str(state_dir.resolve()) if state_dir else "",
                           persist, idle_s, backend, threads or 0)
    if state_dir is not None:   # the model would fail to load (and tritonserver 2.51 hang): say it now
        check_state_dir(state_dir)
    write_repository(export_dir, repo, options, force=force)
    click.echo(f"wrote {repo}: infini_stream (Python backend, {strategy} strategy, {max_streams} streams per "
               f"instance, persist {persist if state_dir else 'never (no --state-dir)'}), infini_segment_onnx and "
               "infini_segment_trt (implicit state; NVIDIA's server image)")
    if start:
        _run_server(repo, state_dir, persist)


def _check_flavour(ctx, openai: bool, start: bool, repo: Path | None) -> None:
    """--openai serves in this process (no repository, no Triton batcher); without it, --repo is required."""
    from ..errors import BadInputError

    if not openai:
        for name in ("port", "model_name"):
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise BadInputError(f"--{name.replace('_', '-')} needs --openai")
        if repo is None:
            raise BadInputError("--repo DIR is required: the model repository to write (or serve the OpenAI API with "
                                "--openai --start)")
        return
    if not start:
        raise BadInputError("--openai needs --start: it serves the export in this process, and writes nothing")
    given = [f"--{n.replace('_', '-')}" for n in ("repo", "strategy", "max_batch", "instances", "force")
             if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
    if given:
        raise BadInputError(f"{', '.join(given)}: Triton's options; --openai serves the export in this process "
                            "(no repository, no sequence batcher)")


def _run_openai(export_dir: Path, port: int, model_name: str | None, backend: str, threads: int | None,
                max_streams: int, state_dir: Path | None, persist: str, idle_s: float) -> None:
    from ..runtime.serving.openai_api import OpenAIServer, engine_from_export

    engine = engine_from_export(export_dir, model_name, backend, threads, max_streams,
                                state_dir.resolve() if state_dir else None, persist, idle_s)
    server = OpenAIServer(engine, port).start()
    click.echo(f"serving the OpenAI API on {server.url} (model {engine.model_name!r}; sessions "
               + (f"persisted to {state_dir}, --persist {persist})" if state_dir else "in memory only)")
               + "; Ctrl-C stops it")
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, f: stop.append(s))
    try:
        while not stop and server.thread.is_alive():
            time.sleep(0.5)
    finally:
        held = server.stop()
    click.echo(f"stopped; {held} session(s) held in memory "
               + (f"persisted to {state_dir}" if state_dir else "dropped (no --state-dir)"))


def _run_server(repo: Path, state_dir: Path | None, persist: str) -> None:
    from ..errors import InfiniError
    from ..runtime.serving.server import TritonServer
    from ..paths import cache_root

    server = TritonServer(repo, cache_root(), log=repo.parent / f"{repo.name}.server.log")
    server.start()
    click.echo(f"serving on http://{server.url} (gRPC 127.0.0.1:{server.ports['grpc']}); log {server.log}; "
               f"Ctrl-C stops it")
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, f: stop.append(s))
    try:
        while not stop and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        code = server.stop()
    if not stop:   # nobody asked: the server died (killed, out of memory)
        raise InfiniError(f"tritonserver exited on its own ({_exit_status(code)}; log {server.log}): "
                          + _lost(state_dir, persist))
    if state_dir is None:
        click.echo(f"tritonserver stopped (exit {code}); its open streams were held in memory only (no --state-dir)")
    elif server.persisted_at_stop is None:
        raise InfiniError(f"tritonserver stopped (exit {code}) before every model instance confirmed persisting "
                          f"its open streams: {_lost(state_dir, persist)}")
    else:
        click.echo(f"tritonserver stopped (exit {code}); {server.persisted_at_stop} open stream(s) persisted to "
                   f"{state_dir}")


def _exit_status(code: int | None) -> str:
    try:
        return f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
    except ValueError:
        return f"exit {code}"


def _lost(state_dir: Path | None, persist: str) -> str:
    """What a server that stopped without draining kept, by its persistence."""
    if state_dir is None:
        return "its streams were held in memory only (no --state-dir) and are lost"
    if persist == "every":
        return f"every request it answered was persisted to {state_dir} (--persist every)"
    return (f"streams still open lost what was fed since their last END or idle expiry (--persist end; "
            f"{state_dir} holds the rest)")
