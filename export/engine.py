"""``build_engines``: an export folder's graphs -> TensorRT engines, recorded in ``infini.json``.

Stages, as Polygraphy names them::

    segment.onnx --NetworkFromOnnxPath--> network (every node supported, or an error naming them)
                 --EngineFromNetwork(profile, targets)--> segment.engine (bytes, written atomically)
                 --> infini.json["tensorrt"]: flavour, version, targets, each engine's sha256 and size

TensorRT 11 and TensorRT-RTX are strongly typed (10 is asked to be, trt_shim.py): an
engine's precision is its graph's, so there is no precision option here. One
optimisation profile per engine covers the batch and segment-length ranges
(``n`` only exists in the segment graph; the decode graph has ``batch`` alone).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ..errors import BadInputError, IncompatibleArtifactError
from ..models import spec
from . import workarounds
from .manifest import Manifest, load_manifest, sha256_file
from .trt_shim import Logger, Trt, load

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


def dim_ranges(options: BuildOptions, segment_len: int) -> dict[str, tuple[int, int, int]]:
    """{"batch": (min, opt, max), "n": (min, opt, max)}, checked: 1 <= min <= opt <= max (n <= segment_len)."""
    ranges = {spec.BATCH: (options.min_batch, options.opt_batch, options.max_batch),
              spec.SEQ: (options.min_n, options.opt_n or segment_len, options.max_n or segment_len)}
    for dim, (lo, opt, hi) in ranges.items():
        if not 1 <= lo <= opt <= hi:
            raise BadInputError(f"profile for {dim!r} must satisfy 1 <= min <= opt <= max; got {lo}, {opt}, {hi}")
    if ranges[spec.SEQ][2] > segment_len:
        raise BadInputError(f"--max-n {ranges[spec.SEQ][2]} is more than the segment length {segment_len}")
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
    proto = onnx.load(str(path), load_external_data=False)   # the parser reads external weights from path's folder
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


def EngineFromNetwork(net: Network, shapes: dict, targets: tuple = (), timing_cache: str | None = None):
    """(serialised engine bytes, compute capabilities it runs on). One optimisation profile: ``shapes``."""
    trt, module = net.trt, net.trt.module
    config = net.builder.create_builder_config()
    config.profiling_verbosity = module.ProfilingVerbosity.DETAILED   # layer names for the inspector
    profile = net.builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    runs_on = trt.set_compute_capabilities(config, tuple(targets))
    cache_path = Path(timing_cache) if timing_cache and trt.has_timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    data = net.builder.build_serialized_network(net.network, config)
    if data is None:
        raise IncompatibleArtifactError(f"{trt.title} could not build an engine: {net.logger.last_error()}")
    if cache_path is not None:
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(data)), runs_on


def build_engines(export_dir, options: BuildOptions = BuildOptions()) -> Manifest:
    """Build one engine per graph of ``export_dir`` (hash-checked first) and record them in its manifest."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    trt = load(options.backend)
    if options.plugin and not trt.has_plugins:
        raise BadInputError(f"--plugin needs full TensorRT (tensorrt.plugin); {trt.title} has no plugin API: "
                            "use --backend tensorrt, or build without --plugin (the memory node is inlined)")
    ranges = dim_ranges(options, manifest.config.segment_len)
    engines, files, runs_on = {}, dict(manifest.files), []
    for name, entry in manifest.graphs.items():
        graph = manifest.verify_graph(export_dir, entry.file)
        started = time.perf_counter()
        shapes = profile_shapes(entry.inputs, ranges)
        net = NetworkFromOnnxPath(trt, graph, options.plugin)
        data, runs_on = EngineFromNetwork(net, shapes, options.target_cc, options.timing_cache)
        file = Path(entry.file).stem + ENGINE_SUFFIX
        _write_atomic(export_dir / file, data)
        files[file] = sha256_file(export_dir / file)
        engines[name] = {"file": file, "graph": entry.file, "sha256": files[file], "bytes": len(data),
                         "build_s": round(time.perf_counter() - started, 3), "layers": net.network.num_layers,
                         "profiles": [{k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()}]}
    record = {"flavour": trt.flavour, "version": trt.version, "precision": manifest.precision,
              "strongly_typed": True, "compute_capabilities": runs_on,
              "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()
                          if k != "timing_cache"}, "engines": engines}
    if options.timing_cache:
        record["timing_cache"] = options.timing_cache if trt.has_timing_cache else \
            f"not used: timing caches are a no-op in {trt.title}"
    updated = Manifest(**{**manifest.__dict__, "files": files, "tensorrt": record})
    updated.write(export_dir)
    return updated


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
