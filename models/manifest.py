"""The manifest ``infini.json``: what an export folder holds and what produced it.

Runtimes read tensor names, dtypes and shapes from here and never re-derive
them. :func:`load_manifest` checks the format version; :meth:`Manifest.verify`
checks a file's sha256 before anything uses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text
from ..errors import IncompatibleArtifactError, InfiniError
from .config import InfiniConfig
from .spec import TensorSpec
from ..paths import describe_absent, inside, parse_json
from .manifest_schema import SchemaError, check_consistent, check_schema

MANIFEST_FILE = "infini.json"
CHECKPOINT_DIR = "checkpoint"   # the torch checkpoint an export keeps next to its graphs (config, weights, tokenizer)
FORMAT = "infini-deploy-export"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_export_dir(path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


@dataclass(frozen=True)
class GraphEntry:
    """One graph file of the export and its I/O, in the order the graph declares them."""
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphEntry":
        return cls(d["file"], [TensorSpec.from_dict(s) for s in d["inputs"]],
                   [TensorSpec.from_dict(s) for s in d["outputs"]])


FUSED_ATTENTION = "GroupQueryAttention (com.microsoft)"   # ``attention`` of an `infini export --fused` folder


@dataclass(frozen=True)
class Manifest:
    config: InfiniConfig
    precision: str                      # fp32 | fp16 | bf16 | int8 | int4 (weights); state is always float32
    opset: int
    graphs: dict[str, GraphEntry]       # "segment" -> its file and I/O
    files: dict[str, str]               # every file of the folder (graphs, checkpoint) -> sha256
    attention: str = ""                 # "Attention op", "decomposed" or FUSED_ATTENTION
    memory_op: dict = field(default_factory=dict)      # domain, op_type, version of the memory node
    versions: dict = field(default_factory=dict)       # torch, onnx, onnxruntime, onnxscript, infini_deploy
    validation: dict = field(default_factory=dict)     # the export-time comparison against torch
    tensorrt: dict = field(default_factory=dict)       # `infini build`: flavour, version, targets, engines
    weights_sha256: str = ""            # the weights' tensors (runtime/snapshot.py): names the model in snapshots
    quantization: dict = field(default_factory=dict)   # int8/int4: the tool, weights, activations, nodes

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "config_digest": self.config.digest(), "precision": self.precision, "opset": self.opset,
                "attention": self.attention, "memory_op": self.memory_op,
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "files": dict(self.files),
                "versions": self.versions, "validation": self.validation,
                **({"weights_sha256": self.weights_sha256} if self.weights_sha256 else {}),
                **({"tensorrt": self.tensorrt} if self.tensorrt else {}),
                **({"quantization": self.quantization} if self.quantization else {})}

    def write(self, export_dir: Path) -> Path:
        """Write ``infini.json`` atomically (a temp file renamed over it): readers never see half a manifest."""
        path = Path(export_dir) / MANIFEST_FILE
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", force=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(InfiniConfig.from_dict(d["config"]), d["precision"], int(d["opset"]),
                   {k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()}, dict(d["files"]),
                   d.get("attention", ""), d.get("memory_op", {}), d.get("versions", {}),
                   d.get("validation", {}), d.get("tensorrt", {}), d.get("weights_sha256", ""),
                   d.get("quantization", {}))

    def verify_graph(self, export_dir: Path, name: str) -> Path:
        """:meth:`verify` for a graph file and, when the manifest lists one, its external data (.onnx.data)."""
        if f"{name}.data" in self.files:
            self.verify(export_dir, f"{name}.data")
        return self.verify(export_dir, name)

    def verify(self, export_dir: Path, name: str) -> Path:
        """The path of file ``name`` after checking it is inside the folder, exists and matches its sha256."""
        path = inside(Path(export_dir), name, Path(export_dir) / MANIFEST_FILE)
        if name not in self.files:
            raise IncompatibleArtifactError(f"{export_dir}/{MANIFEST_FILE} does not list {name}")
        if not path.is_file():
            what = describe_absent(path)
            where = "from the export folder" if what == "is missing" else "in the export folder"
            hint = "it was deleted or moved" if what == "is missing" else "something else took its name"
            raise IncompatibleArtifactError(f"{path} {what} {where} ({hint}; export again)")
        actual = sha256_file(path)
        if actual != self.files[name]:
            raise IncompatibleArtifactError(
                f"{path} does not match its manifest: sha256 {actual[:12]}..., {MANIFEST_FILE} records "
                f"{self.files[name][:12]}... (the file was changed, truncated or replaced; export again)")
        return path


def load_manifest(export_dir) -> Manifest:
    """Read and check ``infini.json`` of an export folder: its schema, its graphs' I/O against the spec its
    config implies, every path inside the folder, and its config against the export's checkpoint.
    File hashes are checked by ``verify`` before a file is used."""
    folder = Path(export_dir)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise IncompatibleArtifactError(f"{export_dir} is not an export folder: {MANIFEST_FILE} is missing "
                                        "(make one with `infini export`)")
    data = parse_json(path.read_bytes(), path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IncompatibleArtifactError(f"{path} is not an infini-deploy manifest (format {FORMAT!r} expected)")
    if data.get("format_version") != FORMAT_VERSION or isinstance(data.get("format_version"), bool):
        raise IncompatibleArtifactError(f"{path} has format version {data.get('format_version')!r}; this "
                                        f"infini-deploy reads version {FORMAT_VERSION}: export again")
    try:
        check_schema(data)
        manifest = Manifest.from_dict(data)
    except SchemaError as e:
        raise IncompatibleArtifactError(f"{path} is incomplete or malformed: {e}") from None
    except InfiniError as e:
        raise IncompatibleArtifactError(f"{path} is incomplete or malformed: {e}") from None
    check_consistent(manifest, folder, data)
    return manifest


def load_onnx(path, external_data: bool = True):
    """``onnx.load`` with one-line errors: a file that is not a readable graph, or whose external data is
    missing or would be read from outside the graph's folder, is an IncompatibleArtifactError."""
    import onnx
    from onnx import external_data_helper

    path = Path(path)
    if path.stat().st_size == 0:
        raise IncompatibleArtifactError(f"{path} is empty (0 bytes); expected an ONNX graph")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:   # noqa: BLE001 (protobuf's DecodeError and onnx's own)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IncompatibleArtifactError(f"{path} is not a readable ONNX graph (corrupt or truncated: {first})") from None
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            data = inside(path.parent, location, f"{path}: its external data")
            if not data.is_file():
                raise IncompatibleArtifactError(f"{path}: its external data {location!r} is missing")
    if external_data:
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as e:   # noqa: BLE001
            raise IncompatibleArtifactError(f"{path}: its external data cannot be read ({e})") from None
    return proto
