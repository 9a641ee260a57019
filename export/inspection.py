"""``inspect_path``: what an export folder, an ``.onnx`` graph or a TensorRT engine holds, as a dict.

- export folder: the manifest's graphs (I/O, sizes), precision and the TensorRT build record;
- ``.onnx``: I/O, opset, precision, op counts, and TensorRT's parsed layers when a TensorRT
  module is installed (the network before fusion: no GPU needed);
- engine: its header (flavour, version), size, the manifest's record when it sits in an
  export folder, and the engine inspector's I/O, profiles and layers when the engine
  deserialises here (that needs a GPU it runs on; without one the dict says so).

``format_inspection`` renders the dict as text; `infini inspect --json` prints it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import BadInputError, IncompatibleArtifactError
from ..paths import inside
from ..models.manifest import MANIFEST_FILE, is_export_dir, load_manifest, load_onnx
from ..runtime.trt_shim import Logger, engine_header, load

ONNX_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
SHOWN_LAYERS = 20


def inspect_path(path) -> dict:
    path = Path(path)
    if path.is_dir():
        if not is_export_dir(path):
            raise BadInputError(f"{path} is a folder without {MANIFEST_FILE}; expected an export folder, an .onnx "
                                "file or an engine")
        return inspect_export(path)
    if not path.is_file():
        raise BadInputError(f"{path} does not exist; expected an export folder, an .onnx file or an engine")
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    return inspect_engine(path)


def inspect_export(folder: Path) -> dict:
    m = load_manifest(folder)
    missing = [name for name in m.files if not inside(folder, name).is_file()]
    if missing:
        raise IncompatibleArtifactError(f"{folder} is incomplete: {', '.join(missing)} "
                                        f"{'is' if len(missing) == 1 else 'are'} missing (listed in {MANIFEST_FILE}); "
                                        "export again")
    for name in m.files:   # what it shows must be what it holds
        m.verify(folder, name)
    graphs = {name: {"file": g.file, "bytes": (folder / g.file).stat().st_size,
                     "inputs": [s.to_dict() for s in g.inputs], "outputs": [s.to_dict() for s in g.outputs]}
              for name, g in m.graphs.items()}
    return {"kind": "export", "path": str(folder), "precision": m.precision, "opset": m.opset,
            "attention": m.attention, "memory_op": m.memory_op, "graphs": graphs, "tensorrt": m.tensorrt or None}


def inspect_onnx(path: Path) -> dict:
    from .graph import ONNX_DTYPES

    names = {v: k for k, v in ONNX_DTYPES.items()}
    proto = load_onnx(path, external_data=False)

    def io(values):
        return [{"name": v.name, "dtype": names.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    outputs = io(proto.graph.output)
    floats = [o["dtype"] for o in outputs if o["dtype"] in ONNX_PRECISION]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    info = {"kind": "onnx", "path": str(path), "bytes": path.stat().st_size, "opset": opset,
            "precision": ONNX_PRECISION[floats[0]] if floats else None, "inputs": io(proto.graph.input),
            "outputs": outputs, "nodes": len(proto.graph.node),
            "ops": dict(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in proto.graph.node)),
            "functions": [f"{f.domain}::{f.name}" for f in proto.functions]}
    info["tensorrt_layers"] = _network_layers(path)
    return info


def _network_layers(path: Path):
    """TensorRT's layers for the graph (parsed, before fusion), or a string saying why there are none."""
    from ..errors import InfiniError
    from .engine import NetworkFromOnnxPath

    try:
        trt = load("auto")
        net = NetworkFromOnnxPath(trt, path)
    except InfiniError as e:
        return f"not available: {e}"
    layers = [net.network.get_layer(i) for i in range(net.network.num_layers)]
    return [{"name": layer.name, "type": str(layer.type).split(".")[-1]} for layer in layers]


def inspect_engine(path: Path) -> dict:
    header = engine_header(path)
    info = {"kind": "engine", "path": str(path), "bytes": path.stat().st_size, **header, "manifest": None}
    folder = path.parent
    if is_export_dir(folder):
        record = load_manifest(folder).tensorrt
        for graph, engine in record.get("engines", {}).items():
            if engine["file"] == path.name:
                info["manifest"] = {**{k: v for k, v in record.items() if k != "engines"}, **engine, "graph_name": graph}
    info["inspector"] = _inspector(path, header["flavour"])
    return info


def _inspector(path: Path, flavour: str):
    """The engine inspector's view (I/O, profile shapes, layers), or a string saying why there is none."""
    import json

    import torch

    from ..errors import InfiniError

    if not torch.cuda.is_available():
        return "not available: deserialising an engine needs a CUDA GPU it runs on; none here"
    try:
        trt = load(flavour)
    except InfiniError as e:
        return f"not available: {e}"
    logger = Logger(trt)
    engine = trt.runtime(logger.logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        return f"not available: {trt.title} cannot deserialise it here: {logger.last_error()}"
    module = trt.module
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == module.TensorIOMode.INPUT
        tensors.append({"name": name, "io": "input" if is_input else "output",
                        "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1],
                        "shape": list(engine.get_tensor_shape(name)),
                        "profile": [list(map(list, engine.get_tensor_profile_shape(name, 0)))] if is_input else None})
    layers = json.loads(engine.create_engine_inspector().get_engine_information(
        module.LayerInformationFormat.JSON)).get("Layers", [])
    return {"tensors": tensors, "profiles": engine.num_optimization_profiles,
            "layers": [layer if isinstance(layer, str) else layer.get("Name", str(layer)) for layer in layers]}


def format_inspection(info: dict) -> str:
    lines = [f"{info['path']}: {info['kind']}" + (f", {info['bytes']:,} bytes" if "bytes" in info else "")]
    if info["kind"] == "export":
        lines.append(f"  precision {info['precision']}, opset {info['opset']}, local attention: {info['attention']}")
        for name, g in info["graphs"].items():
            lines.append(f"  graph {name}: {g['file']} ({g['bytes']:,} bytes)")
            lines += _io_lines(g["inputs"], g["outputs"])
        lines += _tensorrt_lines(info["tensorrt"])
    elif info["kind"] == "onnx":
        lines.append(f"  precision {info['precision']}, opset {info['opset']}, {info['nodes']} nodes, "
                     f"functions: {', '.join(info['functions']) or 'none'}")
        lines += _io_lines(info["inputs"], info["outputs"])
        lines += _layer_lines(info["tensorrt_layers"], "TensorRT network layers (parsed, before fusion)")
    else:
        lines.append(f"  built by {info['flavour']} {info['version']} (engine header)")
        if info["manifest"]:
            record = info["manifest"]
            lines += _tensorrt_lines({**record, "engines": {record["graph_name"]: record}})
        inspector = info["inspector"]
        if isinstance(inspector, str):
            lines.append(f"  engine inspector: {inspector}")
        else:
            lines += [f"  {t['io']} {t['name']}: {t['dtype']} {t['shape']}"
                      + (f" profile min/opt/max {t['profile'][0]}" if t["profile"] else "") for t in inspector["tensors"]]
            lines += _layer_lines(inspector["layers"], "engine layers")
    return "\n".join(lines)


def _io_lines(inputs, outputs) -> list[str]:
    return ([f"    input  {s['name']}: {s['dtype']} {s['shape']}" for s in inputs]
            + [f"    output {s['name']}: {s['dtype']} {s['shape']}" for s in outputs])


def _tensorrt_lines(record) -> list[str]:
    if not record:
        return ["  no TensorRT engines (build them with `infini build`)"]
    lines = [f"  TensorRT: {record['flavour']} {record['version']}, precision {record['precision']} (strongly "
             f"typed), runs on compute capability {', '.join(record['compute_capabilities'])}"]
    for name, e in record["engines"].items():
        lines.append(f"  engine {name}: {e['file']} ({e['bytes']:,} bytes, sha256 {e['sha256'][:12]}..., "
                     f"{e['layers']} network layers, built in {e['build_s']:.1f} s)")
        for tensor, shapes in e["profiles"][0].items():
            lines.append(f"    profile {tensor}: min {shapes['min']} opt {shapes['opt']} max {shapes['max']}")
    return lines


def _layer_lines(layers, title: str) -> list[str]:
    if isinstance(layers, str):
        return [f"  {title}: {layers}"]
    names = [layer if isinstance(layer, str) else f"{layer['type']:<14} {layer['name']}" for layer in layers]
    more = len(names) - SHOWN_LAYERS
    return ([f"  {title}: {len(names)}"] + [f"    {n}" for n in names[:SHOWN_LAYERS]]
            + ([f"    ... {more} more (--json lists all)"] if more > 0 else []))
