"""The user cache: what a command makes once and reuses (an export of the bundled model, a conversion of a
wheel's model with its adapter, scratch folders of the benchmarks), each checked before reuse and redone when
damaged. The cache is this tool's own folder ($INFINI_CACHE, else $XDG_CACHE_HOME/infini-deploy, else
~/.cache/infini-deploy): a damaged entry is moved aside, never deleted (it may hold a file someone put there)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import BadInputError, MissingBackendError
from ..paths import cache_root


def scratch():
    """A temporary folder under the cache, removed on exit; a killed run's are removed by the next one."""
    from ..atomic import scratch_folder

    return scratch_folder(cache_root() / "scratch")


def bundled_digest(checkpoint: Path) -> str:
    from ..models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((checkpoint / name).read_bytes())
    return h.hexdigest()[:16]


def cached_conversion(gguf: Path, adapter: Path, echo=print, attend_previous: bool = False) -> Path:
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


def cached_export(checkpoint: Path, echo=print) -> Path:
    """The checkpoint's export folder in the user cache (exported once, then reused).

    A cached export that fails its checks (a file deleted, changed or truncated; a broken manifest) or lacks a
    step this version exports is exported again; the cache is this tool's own folder, so it is replaced without asking."""
    import time

    from .exporter import export_model
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

    from ..models.spec import GRAPHS

    try:
        manifest = load_manifest(folder)
        for name in manifest.files:
            manifest.verify(folder, name)
    except InfiniError as e:
        return str(e).splitlines()[0]
    missing = [g for g in GRAPHS if g not in manifest.graphs]
    if missing:   # an export made before this version wrote those steps (attend_previous: decode and chunk)
        return f"it has no {' or '.join(missing)} graph (an older export)"
    return None


def maybe_build_engine(export_dir: Path, echo=print) -> str:
    """Build TensorRT engines when a TensorRT module is installed (RTX builds need no GPU)."""
    from .engine import build_engines
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
