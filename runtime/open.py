"""What MODEL is, and MODEL opened on a backend: the one place every command and the served model ask.

MODEL is a preset name (a freshly initialised model), a checkpoint folder (config.json + model.safetensors),
or an export folder (infini.json, its graphs, its checkpoint, engines once built). Opening checks what the
manifest promises (hashes of the graphs, the engines and the checkpoint kept with them) before anything runs:

    open_runner(MODEL, backend, graph)   one graph on one backend      torch | onnxruntime | openvino | tensorrt
    open_stream(MODEL, backend)          a Stream over the segment, decode and chunk steps of one backend
    load_model(MODEL)                    the torch model (an export's own checkpoint, hash-checked)
    model_tokenizer(MODEL)               its tokenizer (bytes for a preset)

Backends: ``auto`` is onnxruntime for an export folder and torch otherwise; onnxruntime, openvino and tensorrt
need an export folder (tensorrt its engines and a GPU they run on); torch runs any MODEL.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from ..models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, resolve_model, resolve_tokenizer, \
    weights_digest
from ..models.manifest import CHECKPOINT_DIR, is_export_dir, load_manifest
from ..models.model import InfiniTransformer, with_config
from .torch_runner import TorchRunner

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
EXPORTED = ("onnxruntime", "openvino", "tensorrt")   # the backends that run an export folder's graphs
AUTOCAST = ("auto", "bf16", "off")
AUTOCAST_MIN_WIDTH = 256   # measured: tiny (64 wide) is 1.8x slower in bf16, small (256) 1.6-3x and SmolLM2 2.1x faster


def choose_backend(model: str, backend: str = "auto") -> str:
    """The backend ``backend`` names for MODEL ("auto" resolved), or BadInputError naming the valid ones."""
    if backend not in BACKENDS:
        raise BadInputError(f"backend {backend!r} is not known; available: {', '.join(BACKENDS)}")
    exported = is_export_dir(model)
    if backend == "auto":
        return "onnxruntime" if exported else "torch"
    if backend in EXPORTED and not exported:
        raise BadInputError(f"--backend {backend} needs an export folder (with infini.json); {model!r} is "
                            "not one: make one with `infini export`")
    return backend


def load_export(export_dir) -> tuple:
    """(manifest, torch model) of an export folder: the model rebuilt from the checkpoint kept in it, its files
    and its weights checked against the manifest (the graphs were made from exactly these weights)."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        manifest.verify(export_dir, f"{CHECKPOINT_DIR}/{name}")
    model = load_checkpoint(export_dir / CHECKPOINT_DIR)
    if manifest.weights_sha256 and weights_digest(model) != manifest.weights_sha256:
        raise IncompatibleArtifactError(f"{export_dir}/{CHECKPOINT_DIR}/{WEIGHTS_FILE} holds other weights than the "
                                        "export's graphs (its tensors' sha256 differs from infini.json's "
                                        "weights_sha256): a checkpoint from another export put in its place?")
    return manifest, model


def load_model(model: str, seed: int = 0, segment_len: int | None = None, gate: float | None = None,
               attend_previous: bool | None = None) -> InfiniTransformer:
    """The torch model of MODEL (a preset is initialised with ``seed``). ``segment_len``, ``gate`` (every gate
    logit beta set to it) and ``attend_previous`` (True or False; None keeps the model's) rebuild it with those
    changes: checkpoints and presets only (an export's graphs are fixed; changing its torch model would no longer
    be the export)."""
    changes = {k: v for k, v in (("segment_len", segment_len), ("gate", gate), ("attend_previous", attend_previous))
               if v is not None}
    if is_export_dir(model):
        if changes:
            raise BadInputError(f"{', '.join('--' + k.replace('_', '-') for k in changes)} change the model: give "
                                "a checkpoint (torch), not an export")
        return load_export(model)[1]
    net = resolve_model(model, seed)
    net = with_config(net, **{k: v for k, v in changes.items() if k != "gate"})
    if gate is not None:
        for layer in net.layers:
            layer.self_attn.beta.data.fill_(gate)
    return net


def changed_model(model: str, backend: str, seed: int = 0, segment_len: int | None = None, gate: float | None = None,
                  attend_previous: bool | None = None) -> InfiniTransformer | None:
    """The torch model of MODEL with the changes asked (:func:`load_model`), or None when none is: for the
    ``net`` of :func:`open_stream`. The changes run on torch only (an export's graphs are fixed)."""
    if segment_len is None and gate is None and attend_previous is None:
        return None
    if backend not in ("auto", "torch"):
        raise BadInputError(f"--segment-len, --gate and --attend-previous/--segment-local change the model: they run "
                            f"on torch, not --backend {backend}")
    return load_model(model, seed, segment_len, gate, attend_previous)


def model_tokenizer(model: str):
    """The tokenizer MODEL carries: an export folder's (hash-checked), a checkpoint's, or bytes for a preset."""
    if not is_export_dir(model):
        return resolve_tokenizer(model)
    from ..models.tokenizer import load_tokenizer

    manifest = load_manifest(model)
    for name in manifest.files:
        if name.startswith(f"{CHECKPOINT_DIR}/tokenizer"):
            manifest.verify(Path(model), name)
    return load_tokenizer(Path(model) / CHECKPOINT_DIR, manifest.config.vocab_size)


def fastest_autocast(net: InfiniTransformer, device: str) -> str:
    """bf16 on a CPU with native bf16 matmuls for a float32 model at least AUTOCAST_MIN_WIDTH wide, else off."""
    if str(device) != "cpu" or next(net.parameters()).dtype != torch.float32 or net.config.d_model < AUTOCAST_MIN_WIDTH:
        return "off"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "off"
    return "bf16" if " amx_bf16" in flags or " avx512_bf16" in flags else "off"


def open_runner(model: str, backend: str = "auto", graph: str = "segment", device: str = "cpu",
                threads: int | None = None, seed: int = 0, autocast: str = "off",
                net: InfiniTransformer | None = None, compile: bool = False):
    """(runner of ``graph`` of MODEL on ``backend``, the backend's name). ``net``: the torch model to run
    instead of loading MODEL's (load_model with changes). ``autocast`` (torch): "bf16", "off", or "auto"
    (:func:`fastest_autocast`); on openvino "bf16" is its bf16 inference precision and "auto"/"off" f32 (on a
    CPU with bf16 OpenVINO would pick bf16 itself, memory path included: docs/openvino.md). ``threads`` sets
    torch's intra-op threads, onnxruntime's and OpenVINO's. ``compile`` (torch): torch.compile the step."""
    backend = choose_backend(model, backend)
    if autocast not in AUTOCAST:
        raise BadInputError(f"autocast {autocast!r} is not known; available: {', '.join(AUTOCAST)}")
    if threads:
        torch.set_num_threads(threads)
    if backend == "tensorrt":
        from .trt_runner import TrtRunner

        return TrtRunner(model, graph=graph, device="cuda" if device == "cpu" else device), backend
    if backend == "onnxruntime":
        from .ort_runner import OrtRunner

        return OrtRunner(model, provider=device, threads=threads, graph=graph), backend
    if backend == "openvino":
        from .ov_runner import OvRunner

        return OvRunner(model, device=device, threads=threads, graph=graph,
                        precision="bf16" if autocast == "bf16" else "f32"), backend
    net = net if net is not None else load_model(model, seed)
    if autocast == "auto":
        autocast = fastest_autocast(net, device)
    return TorchRunner(net, device=device, graph=graph, autocast=None if autocast == "off" else autocast,
                       compile=compile), backend


def has_graph(model: str, backend: str, graph: str) -> bool:
    """Whether MODEL has ``graph`` on ``backend``: torch has every step; an export made before chunk.onnx has
    no chunk graph, and a build may have left a graph without an engine."""
    if not is_export_dir(model) or choose_backend(model, backend) == "torch":
        return True
    manifest = load_manifest(model)
    return graph in (manifest.tensorrt.get("engines", {}) if choose_backend(model, backend) == "tensorrt"
                     else manifest.graphs)


def open_stream(model: str, backend: str = "auto", device: str = "cpu", threads: int | None = None, seed: int = 0,
                autocast: str = "off", batch: int = 1, net: InfiniTransformer | None = None):
    """(a stream of ``batch`` rows over MODEL's segment, decode and chunk steps on one backend, the backend's name).

    One torch model serves all three steps; the stream carries an attend_previous model's past (runtime/stream.py)."""
    from .stream import Stream

    backend = choose_backend(model, backend)
    if backend == "torch":
        net = net if net is not None else load_model(model, seed)
    runner, backend = open_runner(model, backend, "segment", device, threads, seed, autocast, net)
    steps = {g: open_runner(model, backend, g, device, threads, seed, autocast, net)[0] if has_graph(model, backend, g)
             else None for g in ("decode", "chunk")}
    return Stream(runner, batch, decode_runner=steps["decode"], chunk_runner=steps["chunk"]), backend


def exported_runners(export_dir, threads: int | None = None) -> dict:
    """Every backend that can run this export here: onnxruntime CPU, and CUDA, OpenVINO (CPU, f32) and TensorRT
    when available (TensorRT when the folder has an engine and a GPU it runs on is there)."""
    from .ort_runner import OrtRunner
    from .ov_runner import OvRunner
    from .trt_runner import TrtRunner

    runners = {"onnxruntime-cpu": OrtRunner(export_dir, "cpu", threads)}
    for name, make in (("onnxruntime-cuda", lambda: OrtRunner(export_dir, "cuda", threads)),
                       ("openvino-cpu", lambda: OvRunner(export_dir, "cpu", threads))):
        try:
            runners[name] = make()
        except MissingBackendError:
            pass
    if load_manifest(export_dir).tensorrt:
        try:
            runners["tensorrt"] = TrtRunner(export_dir)
        except MissingBackendError:
            pass
    return runners
