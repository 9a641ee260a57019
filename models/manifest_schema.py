"""What a valid ``infini.json`` is: its schema (:func:`check_schema`) and its consistency with the spec, the
folder and the checkpoint it ships (:func:`check_consistent`).

An edited field, a field of the wrong type, a graph whose listed I/O is not what the config implies, a path
outside the folder, or a config that differs from the export's own checkpoint each give one line naming what
was found and what was expected. (The graphs themselves are checked against this I/O when a runner loads
them: runtime/ort_runner.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import IncompatibleArtifactError, InfiniError
from . import spec
from ..paths import inside, read_json

# the metadata every exported graph carries (export/graph.set_identity): which step, which model
IDENTITY = {"graph": "infini_deploy.graph", "config": "infini_deploy.config_digest",
            "weights": "infini_deploy.weights_sha256"}

HEX64 = re.compile(r"[0-9a-f]{64}")


class SchemaError(ValueError):
    """A manifest field that is missing, unknown or of the wrong type (becomes IncompatibleArtifactError)."""


def _need(value, kind, where: str):
    """``value`` if it is of ``kind`` (a type, tuple of types, or "hex64"); SchemaError otherwise."""
    if kind == "hex64":
        ok = isinstance(value, str) and HEX64.fullmatch(value) is not None
        kind_name = "a sha256 hex digest"
    else:
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _tuple(kind))
        kind_name = " or ".join(k.__name__ for k in _tuple(kind))
    if not ok:
        raise SchemaError(f"{where} is {_short(value)}; expected {kind_name}")
    return value


def _tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _fields(d, where: str, required: dict, optional: dict = {}) -> dict:
    """Check the keys and value kinds of a JSON object; returns it."""
    _need(d, dict, where)
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise SchemaError(f"{where} has unknown field {unknown[0][:40]!r}")
    for key, kind in {**required, **optional}.items():
        if key in d:
            _need(d[key], kind, f"{where}.{key}")
        elif key in required:
            raise SchemaError(f"{where} lacks the field {key!r}")
    return d


TOP = {"format": str, "format_version": int, "config": dict, "config_digest": "hex64", "precision": str,
       "opset": int, "graphs": dict, "files": dict}
TOP_OPTIONAL = {"attention": str, "memory_op": dict, "versions": dict, "validation": dict, "tensorrt": dict,
                "weights_sha256": "hex64", "quantization": dict}
TENSOR = {"name": str, "dtype": str, "shape": list}
TENSOR_OPTIONAL = {"max_dims": dict, "value_range": list}
TENSORRT = {"flavour": str, "version": str, "precision": str, "strongly_typed": bool,
            "compute_capabilities": list, "options": dict, "engines": dict}
ENGINE = {"file": str, "graph": str, "sha256": "hex64", "bytes": int, "build_s": (int, float), "layers": int,
          "profiles": list}


def check_schema(data: dict) -> None:
    """Every field of the manifest present, known and of its type (raises SchemaError)."""
    _fields(data, "infini.json", TOP, TOP_OPTIONAL)
    if data["precision"] not in spec.PRECISIONS:
        raise SchemaError(f"precision is {data['precision'][:20]!r}; expected one of: {', '.join(spec.PRECISIONS)}")
    if not 1 <= data["opset"] <= 100:
        raise SchemaError(f"opset is {data['opset']}; expected an ONNX opset number")
    if "segment" not in data["graphs"]:
        raise SchemaError("graphs lacks the 'segment' graph")
    for name, graph in data["graphs"].items():
        if name not in spec.GRAPHS:
            raise SchemaError(f"graphs has an unknown graph {name[:40]!r}; expected: {', '.join(spec.GRAPHS)}")
        _fields(graph, f"graphs.{name}", {"file": str, "inputs": list, "outputs": list})
        for kind in ("inputs", "outputs"):
            for i, tensor in enumerate(graph[kind]):
                _fields(tensor, f"graphs.{name}.{kind}[{i}]", TENSOR, TENSOR_OPTIONAL)
    for name, digest in data["files"].items():
        _need(digest, "hex64", f"files[{name[:60]!r}]")
    if "tensorrt" in data:
        _fields(data["tensorrt"], "tensorrt", TENSORRT, {"timing_cache": str})
        for graph, engine in data["tensorrt"]["engines"].items():
            where = f"tensorrt.engines.{graph[:40]}"
            _fields(engine, where, ENGINE)
            if len(engine["profiles"]) != 1:
                raise SchemaError(f"{where}.profiles holds {len(engine['profiles'])} profiles; expected 1")
            for tensor, shapes in _need(engine["profiles"][0], dict, f"{where}.profiles[0]").items():
                _fields(shapes, f"{where}.profiles[0].{tensor[:40]}", {"min": list, "opt": list, "max": list})
                for key in ("min", "opt", "max"):
                    for d in shapes[key]:
                        _need(d, int, f"{where}.profiles[0].{tensor[:40]}.{key}[]")
        for cc in data["tensorrt"]["compute_capabilities"]:
            _need(cc, str, "tensorrt.compute_capabilities[]")


def check_consistent(manifest, folder: Path, data: dict) -> None:
    """The manifest agrees with itself, the spec, the folder and the export's checkpoint (IncompatibleArtifact)."""
    where = Path(folder) / "infini.json"
    if data["config_digest"] != manifest.config.digest():
        raise IncompatibleArtifactError(f"{where}: its config does not match its config_digest (the config was "
                                        "edited): export again")
    for name in manifest.files:
        inside(Path(folder), name, where)
    for name, entry in manifest.graphs.items():
        if entry.file not in manifest.files:
            raise IncompatibleArtifactError(f"{where}: graph {name!r} is {entry.file!r}, which its files do not list")
        _check_io(where, name, entry, manifest)
    for graph, engine in manifest.tensorrt.get("engines", {}).items():
        if graph not in manifest.graphs or engine["graph"] != manifest.graphs[graph].file:
            raise IncompatibleArtifactError(f"{where}: TensorRT engine {graph!r} is not built from a graph of "
                                            "this export")
        if manifest.files.get(engine["file"]) != engine["sha256"]:
            raise IncompatibleArtifactError(f"{where}: TensorRT engine {engine['file']!r} is not listed with its "
                                            "sha256 in files")
    _check_checkpoint_config(where, manifest, Path(folder))


def _check_io(where: Path, name: str, entry, manifest) -> None:
    """The graph's listed I/O is exactly what the config and precision imply (models/spec.py)."""
    inputs, outputs = spec.graph_specs(name, manifest.config, spec.PRECISIONS[manifest.precision])
    for kind, listed, expected in (("input", entry.inputs, inputs), ("output", entry.outputs, outputs)):
        got = [s.to_dict() for s in listed]
        want = [s.to_dict() for s in expected]
        if got == want:
            continue
        for i in range(max(len(got), len(want))):
            g = got[i] if i < len(got) else "nothing"
            w = want[i] if i < len(want) else "nothing"
            if g != w:
                raise IncompatibleArtifactError(f"{where}: graph {name!r} {kind} {i} is listed as {_spec(g)}; "
                                                f"its config implies {_spec(w)} (the manifest was edited)")


def _spec(d) -> str:
    if not isinstance(d, dict):
        return str(d)
    text = f"{d['name']!r} {d['dtype']} {d['shape']}"
    extra = {k: d[k] for k in ("max_dims", "value_range") if k in d}
    if extra:
        text += f" {extra}"
    return text if len(text) < 120 else text[:117] + "..."


CHECKPOINT_CONFIG = "checkpoint/config.json"


def _check_checkpoint_config(where: Path, manifest, folder: Path) -> None:
    """The manifest's config is the config of the checkpoint the export ships (when it ships one)."""
    if CHECKPOINT_CONFIG not in manifest.files or not (folder / CHECKPOINT_CONFIG).is_file():
        return   # a missing file is reported when it is used (Manifest.verify)
    from .config import InfiniConfig

    path = manifest.verify(folder, CHECKPOINT_CONFIG)
    try:
        theirs = InfiniConfig.from_dict(read_json(path, "config"))
    except (InfiniError, TypeError) as e:
        raise IncompatibleArtifactError(f"{path} is not a valid config ({e})") from None
    if theirs != manifest.config:
        diff = [k for k, v in manifest.config.to_dict().items() if theirs.to_dict().get(k) != v]
        raise IncompatibleArtifactError(f"{where}: its config differs from its checkpoint's in {', '.join(diff)} "
                                        "(the manifest was edited): export again")


def check_identity(metadata: dict, manifest, graph: str, path) -> None:
    """A graph's own metadata (export/graph.set_identity) names the step and the model its manifest names.
    Graphs exported before it was written carry none and are not checked."""
    if IDENTITY["graph"] not in metadata:
        return
    expected = {IDENTITY["graph"]: graph, IDENTITY["config"]: manifest.config.digest(),
                IDENTITY["weights"]: manifest.weights_sha256 or metadata.get(IDENTITY["weights"])}
    for key, want in expected.items():
        if metadata.get(key) != want:
            what = key.rsplit(".", 1)[-1].replace("_", " ")
            raise IncompatibleArtifactError(
                f"{path} is not this export's {graph} graph: its {what} is {str(metadata.get(key))[:16]!r}, "
                f"infini.json names {str(want)[:16]!r} (a graph from another export put in its place?)")
