"""State snapshots: a stream's whole state in one safetensors file, so a stream can stop and resume.

Tensors (all float32 but the token buffer):

    memory (L, B, H_kv, d, d)   norm (L, B, H_kv, d)   the state after the last committed segment
    pending (B, p) int64                                tokens of the unfinished segment, p < N
    k_cache, v_cache (L, B, H_kv, N, d), d_memory, d_norm    only mid-generation: the decode cache

The safetensors metadata names the model and the position: format and version,
the config digest (and the config), the sha256 of the weights (of the checkpoint file for
export folders, of the tensors for a torch model) and of every graph, batch, position, segments, the decode
cache fill, and a sha256 over the tensor bytes so a damaged file is refused even
where safetensors would still parse it. Files are written to a temp file in the
same folder and renamed over the target: a reader never sees half a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BadInputError, IncompatibleArtifactError
from .runner import BaseRunner

FORMAT = "infini-deploy-snapshot"
FORMAT_VERSION = 1
CACHE = ("k_cache", "v_cache", "d_memory", "d_norm")


def model_identity(runner: BaseRunner) -> dict:
    """What names the model a runner runs: its config digest and, for export folders, file hashes."""
    manifest = getattr(runner, "manifest", None)
    graphs = {name: manifest.files.get(g.file, "") for name, g in manifest.graphs.items()} if manifest else {}
    if manifest:
        weights = "file:" + manifest.files.get("checkpoint/model.safetensors", "")
    elif getattr(runner, "model", None) is not None:
        weights = "tensors:" + _weights_digest(runner)
    else:
        weights = ""
    return {"config_digest": runner.config.digest(), "graphs": graphs, "weights": weights,
            "precision": manifest.precision if manifest else ""}


def _weights_digest(runner) -> str:
    """sha256 of a torch model's weights (float32 bytes, by name); computed once per runner."""
    if getattr(runner, "_weights_sha256", None) is None:
        with torch.no_grad():
            state = {k: v.detach().float().cpu() for k, v in runner.model.state_dict().items()}
        runner._weights_sha256 = _digest(state)
    return runner._weights_sha256


def save_snapshot(stream, path, force: bool = False) -> Path:
    """Write ``stream``'s state to ``path`` atomically; BadInputError if it exists and not ``force``."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path} is a folder; give a file name for the snapshot")
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; choose a new file or pass --force to replace it")
    tensors = {"memory": stream.memory, "norm": stream.norm, "pending": stream.pending}
    if stream._cached:
        tensors.update(zip(CACHE, stream.cache))
    tensors = {k: v.detach().to("cpu", torch.int64 if k == "pending" else torch.float32).contiguous()
               for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **_identity_meta(model_identity(stream.runner)),
            "config": stream.config.to_json(), "batch": str(stream.batch), "position": str(stream.position),
            "segments": str(stream.segments), "cached": str(stream._cached), "tensors_sha256": _digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_snapshot(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a snapshot file, checked for format, version and integrity."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"snapshot {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IncompatibleArtifactError(f"{path} is not a snapshot or is corrupt/truncated ({_first_line(e)})") from None
    if meta.get("format") != FORMAT:
        raise IncompatibleArtifactError(f"{path} is not an infini-deploy snapshot (format {FORMAT!r} expected)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise IncompatibleArtifactError(f"{path} has snapshot format version {meta.get('format_version')!r}; "
                                        f"this infini-deploy reads version {FORMAT_VERSION}")
    if meta.get("tensors_sha256") != _digest(tensors):
        raise IncompatibleArtifactError(f"{path} is corrupt: its tensors do not match the sha256 in its header")
    return meta, tensors


def check_compatible(path, meta: dict, runner: BaseRunner) -> None:
    """Refuse a snapshot of another model (config digest) or another export (graph/weight hashes)."""
    mine = model_identity(runner)
    if meta["config_digest"] != mine["config_digest"]:
        raise IncompatibleArtifactError(
            f"{path} was saved from another model (config digest {meta['config_digest'][:12]}...); this runner's "
            f"model has {mine['config_digest'][:12]}...: resume with the model that wrote it")
    theirs = json.loads(meta.get("graphs", "{}"))
    theirs_w, mine_w = meta.get("weights", "").partition(":"), mine["weights"].partition(":")
    if theirs_w[0] == mine_w[0] and theirs_w[2] and theirs_w[2] != mine_w[2]:  # same kind: file or tensors
        raise IncompatibleArtifactError(f"{path} was saved from a model with other weights (sha256 "
                                        f"{theirs_w[2][:12]}...); this runner's has {mine_w[2][:12]}...")
    shared = set(theirs) & set(mine["graphs"])
    if meta.get("precision") == mine["precision"] and any(theirs[g] != mine["graphs"][g] for g in shared):
        raise IncompatibleArtifactError(f"{path} was saved from another export of this model (graph sha256 "
                                        "differs); resume with the export folder that wrote it")


def check_shapes(path, meta: dict, tensors: dict, config) -> int:
    """The batch of a snapshot after checking every tensor's dtype and shape against ``config``."""
    B = int(meta["batch"])
    L, H, d, N = config.n_layer, config.kv_heads, config.d_head, config.segment_len   # state per KV head
    expected = {"memory": (L, B, H, d, d), "norm": (L, B, H, d)}
    if int(meta.get("cached", 0)):
        expected.update(k_cache=(L, B, H, N, d), v_cache=(L, B, H, N, d), d_memory=(L, B, H, d, d), d_norm=(L, B, H, d))
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
            got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
            raise IncompatibleArtifactError(f"{path}: tensor {name!r} is {got}; expected float32 {shape}")
    pending = tensors.get("pending")
    if pending is None or pending.dim() != 2 or pending.shape[0] != B or pending.shape[1] >= N:
        raise IncompatibleArtifactError(f"{path}: the pending token buffer is missing or not ({B}, < {N})")
    return B


def _identity_meta(identity: dict) -> dict:
    return {"config_digest": identity["config_digest"], "graphs": json.dumps(identity["graphs"], sort_keys=True),
            "weights": identity["weights"], "precision": identity["precision"]}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
