"""`infini demo`: the bundled passkey model, exported, streamed through onnxruntime over a long prompt."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click

from .. import models as _models
from ..errors import BadInputError, MissingBackendError
from .options import THREADS, Number, parse_count, seed_option

BUNDLED = Path(_models.__file__).resolve().parent / "bundled" / "passkey"


def cache_root() -> Path:
    """$INFINI_CACHE, else $XDG_CACHE_HOME/infini-deploy, else ~/.cache/infini-deploy."""
    if os.environ.get("INFINI_CACHE"):
        return Path(os.environ["INFINI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "infini-deploy"


def bundled_digest(checkpoint: Path) -> str:
    from ..models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((checkpoint / name).read_bytes())
    return h.hexdigest()[:16]


def cached_export(checkpoint: Path, echo=click.echo) -> Path:
    """The checkpoint's export folder in the user cache (exported once, then reused).

    A cached export that fails its checks (a file deleted, changed or truncated; a broken manifest) is
    exported again; the cache is this tool's own folder, so it is replaced without asking."""
    import time

    from ..export.exporter import export_model
    from ..models.checkpoint import load_checkpoint

    root = cache_root()
    if root.exists() and not root.is_dir():
        raise BadInputError(f"the cache folder {root} is a file; remove it or set INFINI_CACHE to a folder")
    folder = root / bundled_digest(checkpoint) / "export"
    if folder.exists():
        problem = export_problem(folder)
        if problem is None:
            echo(f"export: {folder} (cached)")
            return folder
        aside = folder.with_name(f"export.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.rename(folder, aside)   # not deleted: it may hold a file someone put there
        echo(f"export: {folder} is damaged ({problem}); moved to {aside.name}, exporting it again")
    else:
        echo(f"export: {folder} (exporting and validating once)")
    export_model(load_checkpoint(checkpoint), folder, "fp32")
    return folder


def export_problem(folder: Path) -> str | None:
    """Why an export folder cannot be used (its manifest or any file it lists fails its check), or None."""
    from ..errors import InfiniError
    from ..export.manifest import load_manifest

    try:
        manifest = load_manifest(folder)
        for name in manifest.files:
            manifest.verify(folder, name)
    except InfiniError as e:
        return str(e).splitlines()[0]
    return None


def maybe_build_engine(export_dir: Path, echo=click.echo) -> str:
    """Build TensorRT engines when a TensorRT module is installed (RTX builds need no GPU)."""
    from ..export.engine import build_engines
    from ..export.manifest import load_manifest
    from ..export.trt_shim import load

    try:
        trt = load("auto")
    except MissingBackendError as e:
        return f"skipped (no TensorRT module: {str(e).splitlines()[0]})"
    if load_manifest(export_dir).tensorrt:
        return f"cached ({trt.title})"
    try:
        record = build_engines(export_dir).tensorrt
    except Exception as e:   # a build that fails must not stop the onnxruntime demo
        return f"failed ({type(e).__name__}: {e})"
    return f"built with {record['flavour']} {record['version']}"


@click.command()
@click.option("--tokens", "count", default="128k", show_default=True, help="Prompt length in tokens (e.g. 128k).")
@click.option("--length", "length", default=None, help="Alias of --tokens (e.g. --length 1m).")
@click.option("--depth", type=Number(0, 1), default=0.5, show_default=True,
              help="Where the key sits: 0 = start, 1 = end.")
@seed_option("Draws the key and the filler.")
@click.option("--filler", type=click.Choice(["fixed", "varied"]), default="varied", show_default=True)
@click.option("--threads", type=THREADS, default=None, help="onnxruntime intra-op threads.")
@click.option("--engine/--no-engine", default=True, show_default=True,
              help="Build a TensorRT engine too when a TensorRT module is installed.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(count, length, depth, seed, filler, threads, engine, progress):
    """Retrieve a passkey hidden in a 128K-token prompt (1M with --length 1m) with the bundled model,
    streamed through onnxruntime in constant memory."""
    from ..models.checkpoint import load_config
    from ..models.passkey import PasskeyPrompt
    from ..runtime.evaluate import passkey_trial
    from ..runtime.measure import human_bytes
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.stream import Stream

    if not (BUNDLED / "model.safetensors").is_file():
        raise BadInputError(f"no bundled checkpoint: {BUNDLED} has no model.safetensors. This install was made "
                            "without the trained passkey model; train one with `infini train passkey OUT_DIR` "
                            "and run `infini passkey OUT_DIR` instead")
    tokens = parse_count(length or count, "--length" if length else "--tokens")
    config = load_config(BUNDLED)
    export_dir = cached_export(BUNDLED)
    if engine:
        click.echo(f"TensorRT engine: {maybe_build_engine(export_dir)}")
    prompt = PasskeyPrompt(tokens, depth, seed, filler)
    stream = Stream(OrtRunner(export_dir, "cpu", threads),
                    decode_runner=OrtRunner(export_dir, "cpu", threads, graph="decode"))
    click.echo(f"streaming a {len(prompt):,}-token passkey prompt (key at depth {depth:g}) through onnxruntime, "
               f"segment {config.segment_len}...")
    r = passkey_trial(stream, prompt, progress=progress)
    verdict = "RETRIEVED" if r["correct"] else "MISSED"
    click.echo(f"key {prompt.key}: the model answered {r['generated'].strip()!r} -> {verdict}")
    click.echo(f"{r['prompt_tokens']:,} tokens in {r['seconds']:.1f} s: {r['tokens_per_s']:,.0f} tokens/s; "
               f"peak RSS {human_bytes(r['peak_rss_bytes'])}")
    kv16 = config.kv_cache_bytes(r["prompt_tokens"], 1, 2)
    click.echo(f"state (M, z): {human_bytes(config.state_bytes(1))} at any length; a full-attention model of the "
               f"same shape would hold a {human_bytes(kv16)} KV cache (fp16; "
               f"{human_bytes(2 * kv16)} fp32), {kv16 / config.state_bytes(1):,.0f}x more")
