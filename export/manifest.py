"""The manifest ``infini.json``: what an export folder holds and what produced it.

Runtimes read tensor names, dtypes and shapes from here and never re-derive
them. :func:`load_manifest` checks the format version; :meth:`Manifest.verify`
checks a file's sha256 before anything uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IncompatibleArtifactError
from ..models.config import InfiniConfig
from ..models.spec import TensorSpec

MANIFEST_FILE = "infini.json"
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


@dataclass(frozen=True)
class Manifest:
    config: InfiniConfig
    precision: str                      # fp32 | fp16 | bf16: weights and activations; state is always float32
    opset: int
    graphs: dict[str, GraphEntry]       # "segment" -> its file and I/O
    files: dict[str, str]               # every file of the folder (graphs, checkpoint) -> sha256
    attention: str = ""                 # "Attention op" or "decomposed"
    memory_op: dict = field(default_factory=dict)      # domain, op_type, version of the memory node
    versions: dict = field(default_factory=dict)       # torch, onnx, onnxruntime, onnxscript, infini_deploy
    validation: dict = field(default_factory=dict)     # the export-time comparison against torch
    tensorrt: dict = field(default_factory=dict)       # `infini build`: flavour, version, targets, engines

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "config_digest": self.config.digest(), "precision": self.precision, "opset": self.opset,
                "attention": self.attention, "memory_op": self.memory_op,
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "files": dict(self.files),
                "versions": self.versions, "validation": self.validation,
                **({"tensorrt": self.tensorrt} if self.tensorrt else {})}

    def write(self, export_dir: Path) -> Path:
        """Write ``infini.json`` atomically (a temp file renamed over it): readers never see half a manifest."""
        path = Path(export_dir) / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(InfiniConfig.from_dict(d["config"]), d["precision"], int(d["opset"]),
                   {k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()}, dict(d["files"]),
                   d.get("attention", ""), d.get("memory_op", {}), d.get("versions", {}),
                   d.get("validation", {}), d.get("tensorrt", {}))

    def verify_graph(self, export_dir: Path, name: str) -> Path:
        """:meth:`verify` for a graph file and, when the manifest lists one, its external data (.onnx.data)."""
        if f"{name}.data" in self.files:
            self.verify(export_dir, f"{name}.data")
        return self.verify(export_dir, name)

    def verify(self, export_dir: Path, name: str) -> Path:
        """The path of file ``name`` after checking it exists and matches its recorded sha256."""
        path = Path(export_dir) / name
        if name not in self.files:
            raise IncompatibleArtifactError(f"{export_dir}/{MANIFEST_FILE} does not list {name}")
        if not path.is_file():
            raise IncompatibleArtifactError(f"{path} is missing from the export folder")
        actual = sha256_file(path)
        if actual != self.files[name]:
            raise IncompatibleArtifactError(
                f"{path} does not match its manifest: sha256 {actual[:12]}..., {MANIFEST_FILE} records "
                f"{self.files[name][:12]}... (the file was changed, truncated or replaced; export again)")
        return path


def load_manifest(export_dir) -> Manifest:
    """Read and check ``infini.json`` of an export folder (format and version; hashes via ``verify``)."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IncompatibleArtifactError(f"{export_dir} is not an export folder: {MANIFEST_FILE} is missing "
                                        "(make one with `infini export`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleArtifactError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IncompatibleArtifactError(f"{path} is not an infini-deploy manifest (format {FORMAT!r} expected)")
    if data.get("format_version") != FORMAT_VERSION:
        raise IncompatibleArtifactError(f"{path} has format version {data.get('format_version')!r}; this "
                                        f"infini-deploy reads version {FORMAT_VERSION}: export again")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleArtifactError(f"{path} is incomplete or malformed ({type(e).__name__}: {e})") from None
