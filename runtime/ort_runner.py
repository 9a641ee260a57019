"""The onnxruntime backend: one graph of an export folder (``segment`` or ``decode``) in an InferenceSession.

CPU provider by default. With onnxruntime-gpu and a GPU, ``provider="cuda"``
binds inputs and outputs to device memory (I/O binding) so the state stays on
the GPU between segments, writing into one of two state buffers per parity
(never the buffer it reads). That path is written against the documented API
and is not exercised by the tests (no onnxruntime-gpu on the CPU machines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from ..models.manifest import FUSED_ATTENTION, load_manifest
from ..models.manifest_schema import check_identity
from ..models import spec
from .runner import TORCH_DTYPES, BaseRunner

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingBackendError("onnxruntime is not installed: pip install onnxruntime "
                                  "(or onnxruntime-gpu for the CUDA provider)") from None
    return onnxruntime


def check_provider(provider: str) -> str:
    """The onnxruntime provider name for ``cpu``/``cuda``, or a clear error naming the available ones."""
    available = _ort().get_available_providers()
    short = {v: k for k, v in PROVIDERS.items()}
    names = ", ".join(short.get(p, p) for p in available)
    if provider not in PROVIDERS:
        raise MissingBackendError(f"requested provider {provider!r}; available: {names}")
    if PROVIDERS[provider] not in available:
        hint = " (install onnxruntime-gpu and use a machine with a CUDA GPU)" if provider == "cuda" else ""
        raise MissingBackendError(f"requested provider {provider!r}{hint}; available: {names}")
    return PROVIDERS[provider]


def session_from_onnx(path: Path, provider: str, threads: int | None = None, profile: str | None = None,
                      emulate_bf16: bool = False):
    """An InferenceSession, or IncompatibleArtifactError when onnxruntime cannot load the file.

    ``emulate_bf16``: run a bf16 graph on a provider without bf16 kernels (runtime/emulate.py).
    """
    from ..limits import max_threads

    ort = _ort()
    options = ort.SessionOptions()
    if threads is not None and not 1 <= threads <= max_threads():
        raise BadInputError(f"threads must be in [1, {max_threads()}] (4 per CPU), got {threads}")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    try:
        model = _emulated(path) if emulate_bf16 else str(path)
        return ort.InferenceSession(model, options, providers=[provider])
    except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, NotImplemented)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IncompatibleArtifactError(f"onnxruntime cannot load {path}: {first}") from None


def _emulated(path: Path) -> bytes:
    import onnx

    from .emulate import emulate_bfloat16

    return emulate_bfloat16(onnx.load(str(path))).SerializeToString()


ORT_TYPES = {"int64": "tensor(int64)", "int32": "tensor(int32)", "float32": "tensor(float)",
             "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}


def check_session_io(session, inputs, outputs, path: Path, emulated_bf16: bool = False) -> None:
    """The loaded graph's inputs and outputs are the manifest's: names, order, dtypes, dims. A graph swapped
    for another with its hash rewritten is refused here, not by a raw onnxruntime error later."""
    def want(s):
        dtype = "float32" if emulated_bf16 and s.dtype == "bfloat16" else s.dtype   # runtime/emulate.py
        return (s.name, ORT_TYPES.get(dtype, dtype), [d for d in s.shape])

    for kind, got, specs in (("input", session.get_inputs(), inputs), ("output", session.get_outputs(), outputs)):
        actual = [(v.name, v.type, list(v.shape)) for v in got]
        expected = [want(s) for s in specs]
        if actual != expected:
            first = next(i for i in range(max(len(actual), len(expected)))
                         if i >= len(actual) or i >= len(expected) or actual[i] != expected[i])
            found = actual[first] if first < len(actual) else "nothing"
            listed = expected[first] if first < len(expected) else "nothing"
            raise IncompatibleArtifactError(f"{path} is not the graph its manifest lists: its {kind} {first} is "
                                            f"{found}, infini.json lists {listed} (another graph under this name?)")


class OrtRunner(BaseRunner):
    """Runs one graph of an export folder, ``graph="segment"`` (default) or ``graph="decode"`` (the decode
    step, for Stream.generate); names, dtypes and shapes come from its manifest."""

    name = "onnxruntime"

    def __init__(self, export_dir, provider: str = "cpu", threads: int | None = None, graph: str = "segment"):
        self.export_dir = Path(export_dir)
        self.manifest = load_manifest(self.export_dir)
        if graph not in self.manifest.graphs:
            raise IncompatibleArtifactError(f"{self.export_dir} has no {graph!r} graph; it has: "
                                            f"{', '.join(self.manifest.graphs)}")
        entry = self.manifest.graphs[graph]
        self.graph = graph
        self.provider = check_provider(provider)
        super().__init__(self.manifest.config, entry.inputs, entry.outputs, "cuda" if provider == "cuda" else "cpu")
        self.path = self.manifest.verify_graph(self.export_dir, entry.file)
        self.threads = threads
        self.session = None
        # onnxruntime's GroupQueryAttention takes a past at batch 1 only when more than one token is new
        # (onnxruntime 1.32): a fused attend_previous segment graph is run one batch row at a time
        self.row_by_row = (graph == "segment" and self.manifest.attention == FUSED_ATTENTION
                           and self.config.attend_previous)

    def activate_impl(self):
        emulate = self.manifest.precision == "bf16" and self.device.type == "cpu"
        self.session = session_from_onnx(self.path, self.provider, self.threads, emulate_bf16=emulate)
        check_session_io(self.session, self.input_specs, self.output_specs, self.path, emulate)
        check_identity(self.session.get_modelmeta().custom_metadata_map, self.manifest, self.graph, self.path)
        self._binding = _CudaBinding(self) if self.device.type == "cuda" else None

    def infer_impl(self, feed):
        if self._binding is not None:
            return self._binding.run(feed)
        arrays = {s.name: feed[s.name].detach().cpu().numpy() for s in self.input_specs}
        names = [s.name for s in self.output_specs]
        batch = arrays[spec.TOKENS].shape[0] if self.row_by_row else 1
        if batch > 1:   # one row at a time, each input and output cut and joined on its batch axis
            rows = [self.session.run(names, {s.name: np.take(arrays[s.name], [b], axis=s.shape.index(spec.BATCH))
                                             for s in self.input_specs}) for b in range(batch)]
            outputs = [np.concatenate(parts, axis=s.shape.index(spec.BATCH))
                       for s, parts in zip(self.output_specs, zip(*rows))]
        else:
            outputs = self.session.run(names, arrays)
        # bf16 logits come back as float32 from the emulated graph: exact bf16 values, so the cast is lossless
        return {s.name: torch.from_numpy(np.ascontiguousarray(a)).to(TORCH_DTYPES[s.dtype])
                for s, a in zip(self.output_specs, outputs)}

    def deactivate_impl(self):
        self.session = None
        self._binding = None


class _CudaBinding:
    """I/O binding on the CUDA provider: torch CUDA tensors in and out, no host copies.

    The state outputs go into one of two preallocated buffer pairs, alternating
    per call, so a call never writes the buffer it reads (the stream feeds the
    previous outputs back as inputs). Not exercised by the tests (see module docstring).
    """

    def __init__(self, runner: OrtRunner):
        self.runner = runner
        self.buffers: dict[tuple, list[dict[str, torch.Tensor]]] = {}
        self.parity = 0

    def run(self, feed):
        session, device = self.runner.session, self.runner.device
        binding = session.io_binding()
        for s in self.runner.input_specs:
            t = feed[s.name].to(device).contiguous()
            feed[s.name] = t
            binding.bind_input(s.name, "cuda", device.index or 0, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        outs = self._outputs(feed)
        for name, t in outs.items():
            binding.bind_output(name, "cuda", device.index or 0, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        session.run_with_iobinding(binding)
        return outs

    def _outputs(self, feed) -> dict[str, torch.Tensor]:
        tokens = feed[spec.TOKENS] if spec.TOKENS in feed else feed[spec.TOKEN][:, None]  # segment | decode
        key = tuple(tokens.shape)
        if key not in self.buffers:
            self.buffers = {key: [self._allocate(tokens.shape) for _ in range(2)]}  # one shape at a time
        self.parity ^= 1
        return self.buffers[key][self.parity]

    def _allocate(self, token_shape) -> dict[str, torch.Tensor]:
        sizes = {spec.BATCH: token_shape[0], spec.SEQ: token_shape[1]}
        return {s.name: torch.empty([sizes.get(d, d) for d in s.shape], dtype=TORCH_DTYPES[s.dtype],
                                    device=self.runner.device) for s in self.runner.output_specs}


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}.get(dtype, np.float32)
