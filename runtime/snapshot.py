"""State snapshots: a stream's whole state in one safetensors file, so a stream can stop and resume.

Tensors (all float32 but the token buffer):

    memory (L, B, H_kv, d, d)   norm (L, B, H_kv, d)   the state after the last committed segment
    pending (B, p) int64                                tokens of the unfinished segment, p < N
    past (L, 2, B, H_kv, m, d)                          attend_previous models: the keys and values carried
    k_cache, v_cache (L, B, H_kv, N, d), d_memory, d_norm    only mid-generation: the decode cache

The safetensors metadata names the model and the position: format and version, the config digest (and the
config), the sha256 of the weights' tensors (models.checkpoint.weights_digest: the same whether a torch model or
an export ran them) and of every graph, the precision, batch, position, segments and the decode cache fill. A
sha256 over all of that and the tensor bytes (format 2) refuses a file whose tensors or header were changed,
even where safetensors would still parse it; every counter is then checked against the model that resumes.
Files are written through atomic.atomic_file: a reader never sees half a snapshot.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file
from ..errors import BadInputError, IncompatibleArtifactError
from ..models.checkpoint import tensors_digest, weights_digest
from ..models.config import SINKS
from ..paths import check_input_file, parse_json
from .runner import BaseRunner

FORMAT = "infini-deploy-snapshot"
FORMAT_VERSION = 2          # 2: the metadata is inside the integrity hash; 1 is still read
CACHE = ("k_cache", "v_cache", "d_memory", "d_norm")
TENSORS = ("memory", "norm", "pending", "past", *CACHE)
META = ("format", "format_version", "config_digest", "graphs", "weights", "precision", "config", "batch",
        "position", "segments", "cached")
MAX_COUNT = 1 << 62         # position and segment counters: any real stream stays far below


def model_identity(runner: BaseRunner) -> dict:
    """What names the model a runner runs: its config digest, its weights' tensors and, for exports, graphs."""
    manifest = getattr(runner, "manifest", None)
    graphs = {name: manifest.files.get(g.file, "") for name, g in manifest.graphs.items()} if manifest else {}
    weights = _weights(runner)
    return {"config_digest": runner.config.digest(), "graphs": graphs,
            "weights": f"tensors:{weights}" if weights else "", "precision": manifest.precision if manifest else ""}


def _weights(runner) -> str:
    """sha256 of the weights' tensors (models.checkpoint.weights_digest), the same for a torch model and its
    export: read from the manifest, or computed once per runner."""
    if getattr(runner, "_weights_sha256", None) is None:
        manifest = getattr(runner, "manifest", None)
        if manifest is not None and manifest.weights_sha256:
            runner._weights_sha256 = manifest.weights_sha256
        elif manifest is not None:   # an export made before manifests recorded it
            from ..models.checkpoint import load_checkpoint

            export_dir = getattr(runner, "export_dir")
            manifest.verify(export_dir, "checkpoint/model.safetensors")
            runner._weights_sha256 = weights_digest(load_checkpoint(Path(export_dir) / "checkpoint"))
        elif getattr(runner, "model", None) is not None:
            runner._weights_sha256 = weights_digest(runner.model)
        else:
            runner._weights_sha256 = ""
    return runner._weights_sha256


def save_snapshot(stream, path, force: bool = False) -> Path:
    """Write ``stream``'s state to ``path`` atomically; BadInputError if it exists and not ``force``."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise BadInputError(f"a snapshot needs a file name, got {path!r}")
    tensors = {"memory": stream.memory, "norm": stream.norm, "pending": stream.pending}
    if stream.past is not None:
        tensors["past"] = stream.past
    if stream.cached:
        tensors.update(zip(CACHE, stream.cache))
    tensors = {k: v.detach().to("cpu", torch.int64 if k == "pending" else torch.float32).contiguous()
               for k, v in tensors.items()}
    identity = model_identity(stream.runner)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config_digest": identity["config_digest"],
            "graphs": json.dumps(identity["graphs"], sort_keys=True), "weights": identity["weights"],
            "precision": identity["precision"], "config": stream.config.to_json(), "batch": str(stream.batch),
            "position": str(stream.position), "segments": str(stream.segments), "cached": str(stream.cached)}
    meta["sha256"] = _digest(meta, tensors)
    with atomic_file(path, force) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def _digest(meta: dict, tensors: dict) -> str:
    """sha256 over every metadata field but the digest itself and over the tensors: nothing that restores
    can change without the file being refused."""
    fields = json.dumps({k: meta[k] for k in META}, sort_keys=True)
    return hashlib.sha256(f"{fields};{tensors_digest(tensors)}".encode()).hexdigest()


def read_snapshot(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a snapshot file, checked for format, version and integrity."""
    path = check_input_file(path, "snapshot")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IncompatibleArtifactError(f"{path} is not a snapshot or is corrupt/truncated ({_first_line(e)})") from None
    if meta.get("format") != FORMAT:
        raise IncompatibleArtifactError(f"{path} is not an infini-deploy snapshot (format {FORMAT!r} expected)")
    version = meta.get("format_version")
    if version not in ("1", str(FORMAT_VERSION)):
        raise IncompatibleArtifactError(f"{path} has snapshot format version {str(version)[:20]!r}; this "
                                        f"infini-deploy reads versions 1 and {FORMAT_VERSION}")
    missing = [k for k in META if k not in meta]
    unknown = sorted(set(tensors) - set(TENSORS))
    if missing or unknown:
        raise IncompatibleArtifactError(f"{path} is not a complete snapshot (missing {missing or 'nothing'}, "
                                        f"unknown tensors {unknown or 'none'})")
    intact = (meta.get("sha256") == _digest(meta, tensors) if version != "1"
              else meta.get("tensors_sha256") == tensors_digest(tensors))
    if not intact:
        raise IncompatibleArtifactError(f"{path} is corrupt: its tensors or header do not match the sha256 "
                                        "in its header")
    return meta, tensors
def check_compatible(path, meta: dict, runner: BaseRunner) -> None:
    """Refuse a snapshot of another model (config), other weights (their tensors, whatever backend ran them)
    or another export of the same weights at the same precision (graph hashes)."""
    mine = model_identity(runner)
    config = parse_json(meta["config"], f"{path} (its config)")
    from ..models.config import InfiniConfig

    try:
        theirs_config = InfiniConfig.from_dict(config)
    except (BadInputError, TypeError) as e:
        raise IncompatibleArtifactError(f"{path} holds an invalid model config ({e})") from None
    if meta["config_digest"] != theirs_config.digest():
        raise IncompatibleArtifactError(f"{path} is corrupt: its config does not match its config digest")
    if meta["config_digest"] != mine["config_digest"]:
        raise IncompatibleArtifactError(
            f"{path} was saved from another model (config digest {meta['config_digest'][:12]}...); this runner's "
            f"model has {mine['config_digest'][:12]}...: resume with the model that wrote it")
    _check_weights(path, meta["weights"], mine["weights"], runner)
    theirs = parse_json(meta["graphs"], f"{path} (its graphs)")
    if not isinstance(theirs, dict) or not all(isinstance(v, str) for v in theirs.values()):
        raise IncompatibleArtifactError(f"{path} is corrupt: its graphs field is not a map of graph hashes")
    shared = set(theirs) & set(mine["graphs"])
    if meta["precision"] == mine["precision"] and any(theirs[g] != mine["graphs"][g] for g in shared):
        raise IncompatibleArtifactError(f"{path} was saved from another export of this model (graph sha256 "
                                        "differs); resume with the export folder that wrote it")


def _check_weights(path, theirs: str, mine: str, runner) -> None:
    kind, _, digest = theirs.partition(":")
    if kind == "file":   # format 1 snapshots of export folders named the checkpoint file
        manifest = getattr(runner, "manifest", None)
        if manifest is None or manifest.files.get("checkpoint/model.safetensors") != digest:
            raise IncompatibleArtifactError(f"{path} (format 1) names its weights by a checkpoint file this runner "
                                            "does not have: resume it on the export folder that wrote it")
        return
    if kind != "tensors" or not digest or not mine:
        raise IncompatibleArtifactError(f"{path} does not name the weights it was saved from; cannot resume it")
    if digest != mine.partition(":")[2]:
        raise IncompatibleArtifactError(f"{path} was saved from a model with other weights (sha256 "
                                        f"{digest[:12]}...); this runner's has {mine.partition(':')[2][:12]}...")


def check_shapes(path, meta: dict, tensors: dict, config) -> dict:
    """The snapshot's counters (batch, position, segments, cached) after checking them, and every tensor's
    dtype, shape and token range, against ``config``: a snapshot restores only what a stream could hold."""
    counts = {k: _count(path, meta, k) for k in ("batch", "position", "segments", "cached")}
    B = counts["batch"]
    L, H, d, N = config.n_layer, config.kv_heads, config.d_head, config.segment_len   # state per KV head
    expected = {"memory": (L, B, H, d, d), "norm": (L, B, H, d)}
    if config.attend_previous:   # its length: what the segments committed so far leave (models/model.py)
        m = tensors["past"].shape[4] if "past" in tensors and tensors["past"].dim() == 6 else -1
        if not (m == 0 if counts["segments"] == 0 else 0 < m <= N + SINKS):
            raise IncompatibleArtifactError(f"{path}: its past holds {m if m >= 0 else 'no'} keys after "
                                            f"{counts['segments']} segments; expected "
                                            + ("none" if counts["segments"] == 0 else f"1 to {N + SINKS}") + " (corrupt)")
        expected["past"] = (L, 2, B, H, m, d)
    elif "past" in tensors:
        raise IncompatibleArtifactError(f"{path}: holds past keys and values, but this model's local attention is "
                                        "segment-local (a snapshot of an attend_previous model?)")
    if counts["cached"]:
        expected.update(k_cache=(L, B, H, N, d), v_cache=(L, B, H, N, d), d_memory=(L, B, H, d, d), d_norm=(L, B, H, d))
    for name in set(CACHE) - set(expected):
        if name in tensors:
            raise IncompatibleArtifactError(f"{path}: holds {name!r} but its decode cache fill is 0 (corrupt)")
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
            got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
            raise IncompatibleArtifactError(f"{path}: tensor {name!r} is {got}; expected float32 {shape}")
    pending = tensors.get("pending")
    if pending is None or pending.dtype != torch.int64 or pending.dim() != 2 or pending.shape[0] != B \
            or pending.shape[1] >= N:
        raise IncompatibleArtifactError(f"{path}: the pending token buffer is missing or not int64 ({B}, < {N})")
    p = pending.shape[1]
    if pending.numel() and not bool(((pending >= 0) & (pending < config.vocab_size)).all()):
        raise IncompatibleArtifactError(f"{path}: its pending tokens hold ids outside the vocabulary "
                                        f"[0, {config.vocab_size - 1}] (corrupt)")
    done = counts["position"] - p
    if done < 0 or not counts["segments"] <= done <= counts["segments"] * N or counts["cached"] > p:
        raise IncompatibleArtifactError(
            f"{path}: position {counts['position']}, {counts['segments']} segments, {p} pending and "
            f"{counts['cached']} cached tokens do not describe a stream of segment length {N} (corrupt)")
    return counts


def _count(path, meta: dict, key: str) -> int:
    text = meta[key]
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 19
            and int(text) <= MAX_COUNT):
        raise IncompatibleArtifactError(f"{path}: its {key} is {text[:30]!r}; expected a whole number")
    value = int(text)
    if key == "batch" and value < 1:
        raise IncompatibleArtifactError(f"{path}: its batch is 0; expected at least 1")
    return value


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
