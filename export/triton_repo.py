"""``write_repository``: an export folder -> a Triton Inference Server model repository.

    REPO/
      infini_stream/             the Python-backend model (runtime/serving/triton_model.py): the path tested
        config.pbtxt             sequence batcher (oldest | direct), controls START/END/READY/CORRID, settings
        1/model.py               a shim importing infini_deploy.runtime.serving.triton_model.TritonPythonModel
        1/export/                a copy of the export folder (hash-checked when the model loads)
      infini_segment_onnx/       the segment graph for Triton's onnxruntime backend, M and z as implicit state
        config.pbtxt
        1/model.onnx             segment.onnx with a batch-first state (Transposes around the graph)
      infini_segment_trt/        the same graph for Triton's TensorRT backend (config; the plan is built on the
        config.pbtxt             target machine, or here when a TensorRT module is installed)

The onnxruntime and TensorRT backends keep a sequence's state themselves (implicit state) but treat dim 0 of
every input, output and state as the batch: our state is [L, B, ...], so those two models get a batch-first
copy, [B, L, ...] (:func:`batch_first`). Neither backend is installable here: their configs are checked by
the real server up to the missing backend, and labelled unexercised (README).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from ..atomic import atomic_folder
from ..errors import BadInputError
from ..models import spec
from ..runtime.serving import protocol as P
from ..models.manifest import load_manifest

STRATEGIES = ("oldest", "direct")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64"}
SHIM = '''"""infini-deploy's served stream model (written by `infini serve`; the code is in the installed package)."""
from infini_deploy.runtime.serving.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class ServeOptions:
    """What `infini serve` takes; the Python model reads them from its config's parameters."""
    strategy: str = "oldest"           # sequence batcher: oldest (batches sequences) | direct (a slot each)
    max_streams: int = 64              # streams one instance holds in memory
    max_batch: int = 16                # requests of different streams in one execute()
    instances: int = 1                 # model instances (processes); a sequence stays on one
    state_dir: str = ""                # snapshots of the streams; "" keeps them in memory only
    persist: str = "end"               # end | every (after each request)
    idle_s: float = 3600.0             # a stream idle this long is persisted and dropped
    backend: str = "onnxruntime"       # runner inside the model: onnxruntime | torch | tensorrt
    threads: int = 0                   # intra-op threads of the runner (0: its default)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise BadInputError(f"strategy {self.strategy!r} is not known; expected one of: {', '.join(STRATEGIES)}")
        if self.persist not in ("end", "every"):
            raise BadInputError(f"persist {self.persist!r} is not known; expected end or every")
        if self.persist == "every" and not self.state_dir:
            raise BadInputError("--persist every needs a --state-dir to persist to")


def write_repository(export_dir, repo, options: ServeOptions = ServeOptions(), force: bool = False) -> Path:
    """Write the model repository ``repo`` for ``export_dir`` (atomically; see the module docstring)."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    for name in manifest.files:
        manifest.verify(export_dir, name)
    with atomic_folder(repo, force, _owned_repository, "model repository") as tmp:
        stream = tmp / P.MODEL_NAME
        (stream / "1").mkdir(parents=True)
        shutil.copytree(export_dir, stream / "1" / "export", ignore=shutil.ignore_patterns(".*"))
        (stream / "1" / "model.py").write_text(SHIM)
        (stream / "config.pbtxt").write_text(stream_config(manifest.config, options))
        for name, backend in (("infini_segment_onnx", "onnxruntime"), ("infini_segment_trt", "tensorrt")):
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(implicit_state_config(manifest, name, backend, options))
        batch_first(export_dir / manifest.graphs["segment"].file, tmp / "infini_segment_onnx" / "1" / "model.onnx")
    return Path(repo)


def _owned_repository(folder: Path) -> set[str] | None:
    if not (folder / P.MODEL_NAME / "config.pbtxt").is_file():
        return None
    from ..paths import relative_files

    return {p for p in relative_files(folder) if p.split("/")[0] in (P.MODEL_NAME, "infini_segment_onnx",
                                                                    "infini_segment_trt")}


def _dims(dims, V: int) -> str:
    return ", ".join(str(V if d == "V" else d) for d in dims)


def stream_config(config, options: ServeOptions) -> str:
    """config.pbtxt of the Python-backend stream model."""
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {_dims(d, 0)} ]{" optional: true" if o else ""} }}'
                        for n, (t, d, o) in P.INPUTS.items())
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {_dims(d, config.vocab_size)} ] }}'
                         for n, (t, d) in P.OUTPUTS.items())
    params = {"max_streams": options.max_streams, "state_dir": options.state_dir, "persist": options.persist,
              "idle_s": options.idle_s, "backend": options.backend, "threads": options.threads}
    return (f'name: "{P.MODEL_NAME}"\nbackend: "python"\nmax_batch_size: {options.max_batch}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"sequence_batching {{\n{_sequence_batching(options, controls=True)}}}\n"
            f"instance_group [ {{ kind: KIND_CPU count: {options.instances} }} ]\n"
            + "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items()))


def _sequence_batching(options: ServeOptions, controls: bool, states: list[str] = ()) -> str:
    # Triton drops a sequence idle past this without telling the model: a little later than the pool does
    lines = [f"  max_sequence_idle_microseconds: {int((options.idle_s + 60) * 1e6)}"]
    if controls:
        lines.append("  control_input [\n" + ",\n".join(
            f'    {{ name: "{name}" control [ {{ kind: CONTROL_SEQUENCE_{kind} int32_false_true: [ 0, 1 ] }} ] }}'
            for name, kind in ((P.START, "START"), (P.END, "END"), (P.READY, "READY")))
            + f',\n    {{ name: "{P.CORRID}" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}'
            + "\n  ]")
    if states:
        lines.append("  state [\n" + ",\n".join(states) + "\n  ]")
    if options.strategy == "oldest":
        # more candidates than the model holds streams: a stream beyond --max-streams gets the model's clear
        # refusal instead of waiting in Triton's backlog until another sequence ends or idles out
        lines.append(f"  oldest {{ max_candidate_sequences: {4 * options.max_streams * options.instances} "
                     f"max_queue_delay_microseconds: 1000 }}")
    else:
        lines.append("  direct { }")
    return "\n".join(lines) + "\n"


def implicit_state_config(manifest, name: str, backend: str, options: ServeOptions) -> str:
    """config.pbtxt of a segment graph whose (M, z), and past, Triton keeps as implicit state (batch-first graph).

    Past's length varies (0 at a stream's start, then N, then SINKS + N): a variable dim, which Triton allows in
    a state whose input and output shapes differ; it starts empty."""
    cfg = manifest.config
    logits = TRITON_DTYPES[spec.PRECISIONS[manifest.precision]]
    states = []
    for s in _states(cfg):
        dims = ", ".join("-1" if d == spec.PAST_LEN else str(d) for d in s.shape if d != spec.BATCH)
        zero = ", ".join("0" if d == spec.PAST_LEN else str(d) for d in s.shape if d != spec.BATCH)
        states.append(f'    {{ input_name: "{s.name}" output_name: "{s.name}_out" data_type: TYPE_FP32 dims: [ {dims} ] '
                      f'initial_state: {{ data_type: TYPE_FP32 dims: [ {zero} ] zero_data: true name: "zero {s.name}" }} }}')
    return (f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {options.max_batch}\n'
            f'input [ {{ name: "{spec.TOKENS}" data_type: TYPE_INT64 dims: [ -1 ] }} ]\n'
            f'output [ {{ name: "{spec.LOGITS}" data_type: {logits} dims: [ -1, {cfg.vocab_size} ] }} ]\n'
            f"sequence_batching {{\n{_sequence_batching(options, False, states)}}}\n"
            f"instance_group [ {{ kind: KIND_CPU count: {options.instances} }} ]\n")


def _states(cfg) -> list:
    return [*spec.state_specs(cfg), *([spec.past_spec(cfg)] if cfg.attend_previous else [])]


def batch_first(src: Path, dst: Path) -> Path:
    """Copy of the segment graph whose state inputs and outputs are batch-first: a Transpose after each state
    input and before each state output moves the batch axis (1 in M and z, 2 in past) to the front, names
    unchanged.

        memory [B, L, H, d, d] -> Transpose -> memory.lbf -> (the graph) -> memory_out.lbf -> Transpose -> memory_out
    """
    model = onnx.load(str(src))
    graph = model.graph
    axes = {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim].index(spec.BATCH)
            for v in graph.input if v.name in (spec.MEMORY, spec.NORM, spec.PAST)}
    for value in list(graph.input) + list(graph.output):
        b = axes.get(value.name.removesuffix("_out"))
        if b is None:
            continue
        dims = value.type.tensor_type.shape.dim
        order = [onnx.TensorShapeProto.Dimension() for _ in dims]
        for new, old in zip(order, [b, *range(b), *range(b + 1, len(dims))]):
            new.CopyFrom(dims[old])
        for d, new in zip(dims, order):
            d.CopyFrom(new)
    rank = {s.name: len(s.type.tensor_type.shape.dim) for s in graph.input}
    nodes = []
    for name, b in axes.items():
        inner = f"{name}.lbf"
        for node in graph.node:
            node.input[:] = [inner if x == name else x for x in node.input]
        to_layer_first = [*range(1, b + 1), 0, *range(b + 1, rank[name])]
        nodes.append(helper.make_node("Transpose", [name], [inner], name=f"/state/{name}/to_layer_first",
                                      perm=to_layer_first))
        out = f"{name}_out"
        for node in graph.node:
            node.output[:] = [f"{out}.lbf" if x == out else x for x in node.output]
        graph.node.append(helper.make_node("Transpose", [f"{out}.lbf"], [out], name=f"/state/{out}/to_batch_first",
                                           perm=[b, *range(b), *range(b + 1, rank[name])]))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    large = model.ByteSize() > 1_900_000_000   # protobuf's 2 GiB limit: the weights go to external data
    if not large:
        onnx.checker.check_model(model)
    onnx.save(model, str(dst), save_as_external_data=large, location=f"{dst.name}.data" if large else None)
    return dst
