"""The TensorRT backend: an export folder's engine, run with ``execute_async_v3`` on its own CUDA stream.

NOT EXERCISED by the tests beyond the checks below: no machine of this project can run
an engine (TensorRT-RTX does not run on compute capability 9.0, full TensorRT is not
installable here; DESIGN.md section 6). It is written against the documented API and
kept thin. What IS tested, because it happens before any GPU work:

- the manifest lists an engine for the graph (`infini build` made it);
- the installed flavour and version are the ones that built it (engines do not load
  in another version): else IncompatibleArtifactError naming both;
- the engine file's sha256 matches the manifest and its header is a TensorRT engine;
- a CUDA GPU of a compute capability the engine targets is there: else
  MissingBackendError naming the GPU found (or none) and what the engine needs.

State stays on the GPU in two buffer pairs, A and B (TensorRT must not read and
write one buffer in one call), swapped per segment as in cuda_graph_runner.py:

    parity 0: tokens, (memory, norm)[A] -> logits, (memory, norm)[B]
    parity 1: tokens, (memory, norm)[B] -> logits, (memory, norm)[A]

A Stream feeds back the state it got, which *is* the other buffer: no copy. With
``cuda_graphs=True`` each (shape, parity) is captured once after one eager call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from ..models import spec
from ..models.manifest import load_manifest
from .trt_shim import TITLES, Logger, check_engine, load
from .runner import TORCH_DTYPES, BaseRunner

OUT = "_out"   # a state input `x` comes back as output `x_out` (models/spec.py)


def engine_record(manifest, export_dir, graph: str) -> dict:
    engines = manifest.tensorrt.get("engines", {})
    if graph not in engines:
        raise IncompatibleArtifactError(f"{export_dir} has no TensorRT engine for the {graph!r} graph: build one "
                                        f"with `infini build {export_dir}`")
    return engines[graph]


def require_gpu(device: torch.device, title: str, runs_on: list[str], check_cc: bool) -> str:
    """The name of the GPU at ``device``, or MissingBackendError saying what was found and what is needed."""
    needs = (f"a CUDA GPU of compute capability {', '.join(runs_on)} (a {title} engine)" if check_cc
             else f"the kind of CUDA GPU it was built on (a {title} engine)")
    if device.type != "cuda":
        raise BadInputError(f"TensorRT runs on a CUDA device; got {str(device)!r}: use --device cuda")
    if not torch.cuda.is_available():
        raise MissingBackendError(f"the TensorRT runner needs {needs}; found no CUDA GPU")
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if check_cc and f"{major}.{minor}" not in runs_on:
        raise MissingBackendError(f"the TensorRT runner needs {needs}; found {name} (compute capability "
                                  f"{major}.{minor}): rebuild with --target-cc, or use full TensorRT there")
    return name


class TrtRunner(BaseRunner):
    """Runs one graph's engine of an export folder; names, dtypes and shapes come from its manifest.

    ``infer`` returns logits as a new tensor and the state as one of the two static
    buffers (valid until the next-but-one call; clone to keep it).
    """

    name = "tensorrt"

    def __init__(self, export_dir, graph: str = "segment", device: str = "cuda", cuda_graphs: bool = False):
        self.export_dir = Path(export_dir)
        self.manifest = load_manifest(self.export_dir)
        record = engine_record(self.manifest, self.export_dir, graph)
        built = self.manifest.tensorrt
        self.trt = load(built["flavour"])
        if self.trt.version != built["version"]:
            raise IncompatibleArtifactError(
                f"{self.export_dir / record['file']} was built with {TITLES[built['flavour']]} {built['version']}; "
                f"installed: {self.trt.title}. An engine only loads in the version that built it: rebuild with "
                f"`infini build {self.export_dir}` or install {built['flavour']}=={built['version']}")
        self.path = self.manifest.verify(self.export_dir, record["file"])
        check_engine(self.path, self.trt)
        entry = self.manifest.graphs[graph]
        super().__init__(self.manifest.config, entry.inputs, entry.outputs, device)
        self.gpu = require_gpu(self.device, self.trt.title, built["compute_capabilities"],
                               self.trt.targets_compute_capability)
        self.cuda_graphs = cuda_graphs
        outputs = {s.name for s in entry.outputs}
        # state kept in two static buffers, read and written in turn; past is copied in and out like any
        # other tensor: the segment step's past_out is longer than its past while the stream starts
        self.state_names = [s.name for s in entry.inputs if s.name + OUT in outputs and s.name != spec.PAST]

    def activate_impl(self):
        self._logger = Logger(self.trt)
        self._runtime = self.trt.runtime(self._logger.logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise IncompatibleArtifactError(f"{self.trt.title} cannot load {self.path}: {self._logger.last_error()}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self._static: dict[tuple, dict] = {}     # input shapes -> buffers (one shape set kept at a time)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def deactivate_impl(self):
        self._graphs.clear()
        self._static.clear()
        self.context = self.engine = self._runtime = None

    def infer_impl(self, feed):
        key = tuple(tuple(feed[s.name].shape) for s in self.input_specs)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buffers = self._buffers(key, feed)
            parity = self._parity(buffers, feed)
            for s in self.input_specs:
                if s.name not in self.state_names:
                    buffers["inputs"][s.name].copy_(feed[s.name], non_blocking=True)
            self._execute(key, buffers, parity)
            result = {name: t.clone() for name, t in buffers["outputs"].items()}
        result.update({name + OUT: buffers["state"][1 - parity][name] for name in self.state_names})
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return result

    def _buffers(self, key: tuple, feed) -> dict:
        if key not in self._static:
            self._static = {key: self._allocate(feed)}   # a new shape: new buffers, old graphs dropped
            self._graphs.clear()
        return self._static[key]

    def _allocate(self, feed) -> dict:
        like = {s.name: torch.empty_like(feed[s.name], device=self.device) for s in self.input_specs}
        state = [{n: like[n] for n in self.state_names}, {n: torch.empty_like(like[n]) for n in self.state_names}]
        sizes = spec.output_dims({d: n for s in self.input_specs for d, n in zip(s.shape, feed[s.name].shape)
                                  if isinstance(d, str)})
        outputs = {s.name: torch.empty([sizes.get(d, d) for d in s.shape], dtype=TORCH_DTYPES[s.dtype],
                                       device=self.device)
                   for s in self.output_specs if s.name.removesuffix(OUT) not in self.state_names}
        inputs = {n: t for n, t in like.items() if n not in self.state_names}
        return {"inputs": inputs, "state": state, "outputs": outputs}

    def _parity(self, buffers: dict, feed) -> int:
        """The buffer pair the fed state already is; otherwise copy it into pair A."""
        for parity in (0, 1):
            if all(feed[n] is buffers["state"][parity][n] for n in self.state_names):
                return parity
        for n in self.state_names:
            buffers["state"][0][n].copy_(feed[n], non_blocking=True)
        return 0

    def _execute(self, key: tuple, buffers: dict, parity: int) -> None:
        graph = self._graphs.get((key, parity))
        if graph is not None:
            graph.replay()
            return
        ctx = self.context
        reads, writes = buffers["state"][parity], buffers["state"][1 - parity]
        for name, t in {**buffers["inputs"], **reads}.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in {**buffers["outputs"], **{n + OUT: t for n, t in writes.items()}}.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise IncompatibleArtifactError(f"{self.trt.title} failed to run {self.path}: {self._logger.last_error()}")
        if self.cuda_graphs:   # captured after one eager call, as TensorRT asks (deferred shape work done)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                ctx.execute_async_v3(self.stream.cuda_stream)
            self._graphs[key, parity] = graph
