"""``build_engines``: an export folder's graphs -> TensorRT engines, recorded in ``infini.json``.

Stages, as Polygraphy names them::

    segment.onnx --NetworkFromOnnxPath--> network (every node supported, or an error naming them)
                 --EngineFromNetwork(profile, targets)--> segment.<sha256[:12]>.engine (bytes, written atomically)
                 --> infini.json["tensorrt"]: flavour, version, targets, each engine's sha256 and size

TensorRT 11 and TensorRT-RTX are strongly typed (10 is asked to be, trt_shim.py): an
engine's precision is its graph's, so there is no precision option here. One
optimisation profile per engine covers the batch and segment-length ranges
(``n`` only exists in the segment graph; the decode graph has ``batch`` alone).
"""

from __future__ import annotations

import hashlib
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ..atomic import output_lock, write_bytes
from ..errors import BadInputError, IncompatibleArtifactError, Interrupted
from ..models import spec
from ..models.config import SINKS
from . import workarounds
from ..models.manifest import Manifest, load_manifest, load_onnx
from .attention import FUSED
from .quantize import QUANTIZED
from ..runtime.trt_shim import Logger, Trt, load

ENGINE_SUFFIX = ".engine"


@dataclass(frozen=True)
class BuildOptions:
    """What `infini build` takes; serialised into the manifest."""
    backend: str = "auto"               # auto | tensorrt | tensorrt-rtx
    min_n: int = 1                      # segment length range of the profile (opt/max default: segment_len)
    opt_n: int | None = None
    max_n: int | None = None
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    target_cc: tuple = ()               # TensorRT-RTX: compute capabilities ("8.9", "12.0"); empty: its default
    plugin: bool = False                # bind infini::Memory to the plugin (full TensorRT only)
    timing_cache: str | None = field(default=None, compare=False)   # read before, written after (not RTX: no-op)


@dataclass
class Network:
    """A parsed network and what must outlive it (the parser owns the weights)."""
    trt: Trt
    logger: Logger
    builder: object
    network: object
    parser: object
    monitor: object = None    # the progress monitor of the build in flight (TensorRT keeps only a pointer)


def dim_ranges(options: BuildOptions, config) -> dict[str, tuple[int, int, int]]:
    """{"batch": (min, opt, max), "n": (min, opt, max)}, checked: 1 <= min <= opt <= max (n <= segment_len);
    an attend_previous model's past covers every length a stream carries, 0 to N + SINKS (opt: the steady one)."""
    segment_len = config.segment_len
    ranges = {spec.BATCH: (options.min_batch, options.opt_batch, options.max_batch),
              spec.SEQ: (options.min_n, options.opt_n or segment_len, options.max_n or segment_len)}
    for dim, (lo, opt, hi) in ranges.items():
        if not 1 <= lo <= opt <= hi:
            raise BadInputError(f"profile for {dim!r} must satisfy 1 <= min <= opt <= max; got {lo}, {opt}, {hi}")
    if ranges[spec.SEQ][2] > segment_len:
        raise BadInputError(f"--max-n {ranges[spec.SEQ][2]} is more than the segment length {segment_len}")
    if config.attend_previous:
        ranges[spec.PAST_LEN] = (0, segment_len + SINKS, segment_len + SINKS)
    return ranges


def profile_shapes(specs, ranges) -> dict[str, tuple[list, list, list]]:
    """Input name -> (min, opt, max) shapes: symbolic dims from ``ranges``, fixed dims as they are."""
    return {s.name: tuple([d if isinstance(d, int) else ranges[d][i] for d in s.shape] for i in range(3))
            for s in specs}


def NetworkFromOnnxPath(trt: Trt, path: Path, plugin: bool = False) -> Network:
    """Parse ``path``; IncompatibleArtifactError naming the nodes TensorRT cannot take.

    Without ``plugin`` each memory node gets its own function copy first (workarounds.function_per_call),
    so the inlined layers have unique names under their layer."""
    logger = Logger(trt)
    builder = trt.module.Builder(logger.logger)
    network = builder.create_network(trt.network_flags())
    parser = trt.module.OnnxParser(network, logger.logger)
    if plugin:
        from .trt_plugin import register_plugin

        register_plugin()
        if not trt.enable_plugin_override(parser):
            raise BadInputError(f"{trt.title}'s ONNX parser has no ENABLE_PLUGIN_OVERRIDE flag: it cannot bind "
                                "infini::Memory to the plugin (TensorRT >= 10.8 can)")
    proto = load_onnx(path, external_data=False)   # the parser reads external weights from path's folder
    if not plugin:
        proto = workarounds.function_per_call(proto)
    if not parser.parse(proto.SerializeToString(), str(path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        where = "; ".join(f"node {e.node_name() or e.node()} ({e.node_operator()}): {e.desc()}" for e in errors[:3])
        raise IncompatibleArtifactError(f"{trt.title} cannot parse {path}: {where or logger.last_error()}")
    return Network(trt, logger, builder, network, parser)


def unsupported_nodes(trt: Trt, path: Path) -> list[str]:
    """Node names of the graph that the ONNX parser reports unsupported (empty when it takes all)."""
    logger = Logger(trt)
    network = trt.module.Builder(logger.logger).create_network(trt.network_flags())
    parser = trt.module.OnnxParser(network, logger.logger)
    parser.supports_model_v2(Path(path).read_bytes(), str(path))
    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    return [names[i] for s in range(parser.num_subgraphs) if not parser.is_subgraph_supported(s)
            for i in parser.get_subgraph_nodes(s)]


def EngineFromNetwork(net: Network, shapes: dict, targets: tuple = (), timing_cache: str | None = None,
                      cancel: list | None = None):
    """(serialised engine bytes, compute capabilities it runs on). One optimisation profile: ``shapes``.
    The build stops early once ``cancel`` (a list) is non-empty."""
    trt, module = net.trt, net.trt.module
    config = net.builder.create_builder_config()
    config.profiling_verbosity = module.ProfilingVerbosity.DETAILED   # layer names for the inspector
    profile = net.builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    runs_on = trt.set_compute_capabilities(config, tuple(targets))
    if cancel is not None and hasattr(module, "IProgressMonitor"):
        config.progress_monitor = net.monitor = _progress_monitor(module, cancel)
    cache_path = Path(timing_cache) if timing_cache and trt.has_timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    data = net.builder.build_serialized_network(net.network, config)
    if data is None:
        if cancel:
            raise Interrupted(cancel[0])
        raise IncompatibleArtifactError(f"{trt.title} could not build an engine: {net.logger.last_error()}")
    if cache_path is not None:
        write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()), force=True)
    return bytes(memoryview(data)), runs_on


def _progress_monitor(module, cancel: list):
    """A TensorRT progress monitor whose every step asks to go on until ``cancel`` is non-empty."""
    base = module.IProgressMonitor

    class Cancel(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            return not cancel

        def phase_finish(self, phase_name):
            pass

    return Cancel()


def build_engines(export_dir, options: BuildOptions = BuildOptions()) -> Manifest:
    """Build one engine per graph of ``export_dir`` (hash-checked first) and record them in its manifest.

    Engines are named by their content (``segment.<sha256[:12]>.engine``) and written before the manifest
    that names them, so the folder is consistent at every instant: a build killed at any point leaves the
    old manifest with the old engines, and the next build removes the new engines nobody names. Ctrl-C and
    SIGTERM cancel the build (TensorRT's progress monitor) and leave the folder as it was."""
    export_dir = Path(export_dir)
    with output_lock(export_dir):   # the lock `infini export` takes on this folder: one writer at a time
        manifest = load_manifest(export_dir)
        if manifest.precision in QUANTIZED:
            raise BadInputError(
                f"{export_dir} is {'a' if manifest.precision == 'gguf' else 'an'} {manifest.precision} export, "
                "quantized for onnxruntime's CPU kernels: TensorRT parses neither its DynamicQuantizeLinear/"
                "MatMulInteger (int8) nor MatMulNBits over float32 activations (int4, gguf); build an engine from "
                "an fp32, fp16 or bf16 export (docs/quantization.md)")
        if manifest.attention == FUSED:
            raise BadInputError(f"{export_dir} was exported with --fused: its local attention is onnxruntime's "
                                f"contrib GroupQueryAttention, which TensorRT cannot parse; export without --fused "
                                f"to build an engine")
        remove_unnamed_engines(export_dir, manifest)   # what a killed build left
        trt = load(options.backend)
        if options.plugin and not trt.has_plugins:
            raise BadInputError(f"--plugin needs full TensorRT (tensorrt.plugin); {trt.title} has no plugin API: "
                                "use --builder tensorrt, or build without --plugin (the memory node is inlined)")
        ranges = dim_ranges(options, manifest.config)
        try:
            updated = _build_all(export_dir, manifest, trt, options, ranges)
            updated.write(export_dir)
        finally:
            remove_unnamed_engines(export_dir, load_manifest(export_dir))
    return updated


def _build_all(export_dir: Path, manifest: Manifest, trt: Trt, options: BuildOptions, ranges) -> Manifest:
    engines, files, runs_on = {}, {k: v for k, v in manifest.files.items() if not is_engine_name(k)}, []
    with deferred_signals() as received:
        for name, entry in manifest.graphs.items():
            graph = manifest.verify_graph(export_dir, entry.file)
            _check_graph(graph, entry, manifest, name)
            started = time.perf_counter()
            shapes = profile_shapes(entry.inputs, ranges)
            net = NetworkFromOnnxPath(trt, graph, options.plugin)
            data, runs_on = EngineFromNetwork(net, shapes, options.target_cc, options.timing_cache, received)
            sha = hashlib.sha256(data).hexdigest()
            file = f"{Path(entry.file).stem}.{sha[:12]}{ENGINE_SUFFIX}"
            write_bytes(export_dir / file, data, force=True)
            files[file] = sha
            engines[name] = {"file": file, "graph": entry.file, "sha256": sha, "bytes": len(data),
                             "build_s": round(time.perf_counter() - started, 3), "layers": net.network.num_layers,
                             "profiles": [{k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()}]}
    record = {"flavour": trt.flavour, "version": trt.version, "precision": manifest.precision,
              "strongly_typed": True, "compute_capabilities": runs_on,
              "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()
                          if k != "timing_cache"}, "engines": engines}
    if options.timing_cache:
        record["timing_cache"] = options.timing_cache if trt.has_timing_cache else \
            f"not used: timing caches are a no-op in {trt.title}"
    return Manifest(**{**manifest.__dict__, "files": files, "tensorrt": record})


def _check_graph(path: Path, entry, manifest: Manifest, name: str) -> None:
    """The graph is the one its manifest lists (I/O and identity), before TensorRT sees it."""
    from .graph import check_io
    from ..models.manifest_schema import check_identity

    proto = load_onnx(path, external_data=False)
    check_io(proto, entry.inputs, entry.outputs)
    check_identity({p.key: p.value for p in proto.metadata_props}, manifest, name, path)


ENGINE_NAME = re.compile(rf"({'|'.join(spec.GRAPHS)})(\.[0-9a-f]{{12}})?{re.escape(ENGINE_SUFFIX)}")


def is_engine_name(name: str) -> bool:
    """A file name `infini build` gives an engine (``segment.engine`` from older builds included)."""
    return ENGINE_NAME.fullmatch(name) is not None


def remove_unnamed_engines(export_dir: Path, manifest: Manifest) -> None:
    """Delete the engines of ours that ``manifest`` does not name (an interrupted or replaced build's)."""
    for path in Path(export_dir).iterdir():
        if is_engine_name(path.name) and path.name not in manifest.files:
            path.unlink(missing_ok=True)


@contextmanager
def deferred_signals():
    """Hold Ctrl-C and SIGTERM while TensorRT builds; yields the list of signals received.

    TensorRT calls back into Python (the logger) from C++: a KeyboardInterrupt raised there is swallowed and
    the build runs to the end. Here the handler only records the signal, the progress monitor cancels the
    build, and KeyboardInterrupt is raised once the build has returned."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
