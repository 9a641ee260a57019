"""The OpenVINO backend: one graph of an export folder (segment, decode or chunk) compiled by OpenVINO.

OpenVINO's ONNX frontend expands no ONNX local functions, and the memory block is one (export/memory_function.py)::

    FrontEnd API failed with OpConversionFailure: ... No conversion rule found for operations: infini.Memory

so the graph is read with its local functions inlined (``onnx.inliner.inline_local_functions``, into a
temporary folder: :func:`model_from_onnx`): the file on disk and its sha256 stay as exported, and what OpenVINO
compiles is the same body of standard ops that onnxruntime runs. No second definition of the memory block exists
for OpenVINO.

Precision: on a CPU with bf16 instructions (avx512_bf16, AMX) OpenVINO computes in bf16 by default without
saying so (measured here: M 0.1-0.3 off after a few segments). ``precision="f32"`` (the default) pins
INFERENCE_PRECISION_HINT to f32, which matches onnxruntime to float32 rounding. ``precision="bf16"`` asks for
bf16 where the device has it (refused in one line where it does not): OpenVINO then runs the weights' MatMuls
and, it decides itself, most of the memory block in bf16; the state tensors stay float32 at the API and their
sums float32. Within tolerance on the presets, it costs SmolLM2 a fifth of its top-1 agreement: measured, not
recommended (docs/openvino.md).

The runner is stateless like the others (the Stream carries M and z): OpenVINO's stateful form (state as
variables inside the compiled model) is not used yet (docs/openvino.md says why).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from ..models.manifest import load_manifest, load_onnx
from ..models.manifest_schema import check_identity
from .runner import TORCH_DTYPES, BaseRunner

PRECISIONS = {"f32": "f32", "bf16": "bf16", "off": "f32"}    # "off": --autocast off, the CLI's word for f32
DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
OV_TYPES = {"int64": "i64", "int32": "i32", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}

_CORE = None


def _ov():
    try:
        import openvino
    except ImportError:
        raise MissingBackendError("openvino is not installed: pip install openvino "
                                  "(or pip install 'infini-deploy[openvino]')") from None
    return openvino


def core():
    """The process's one ov.Core (creating one loads the plugins: about 0.1 s)."""
    global _CORE
    if _CORE is None:
        _CORE = _ov().Core()
    return _CORE


def check_device(device: str) -> str:
    """OpenVINO's device name for ``cpu``/``gpu``/``npu`` (any case), or a clear error naming those present."""
    available = core().available_devices
    names = ", ".join(d.lower() for d in available)
    name = DEVICES.get(str(device).lower())
    if name is None:
        raise MissingBackendError(f"requested OpenVINO device {device!r}; available: {names}")
    if not any(d == name or d.startswith(name + ".") for d in available):
        raise MissingBackendError(f"requested OpenVINO device {device!r} (no driver or no such device here); "
                                  f"available: {names}")
    return name


def check_precision(precision: str, device: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for ``f32``/``bf16`` on ``device``; bf16 only where it has it."""
    if precision not in PRECISIONS:
        raise BadInputError(f"OpenVINO precision {precision!r} is not known; available: f32, bf16")
    hint = PRECISIONS[precision]
    if hint == "bf16" and "BF16" not in core().get_property(device, "OPTIMIZATION_CAPABILITIES"):
        raise BadInputError(f"OpenVINO bf16 needs a {device} with bf16 instructions (avx512_bf16 or AMX on a "
                            "CPU); this one has none: use f32")
    return hint


INLINED_WEIGHTS = "inlined-weights.bin"    # beside the inlined graph, in a temporary folder


def model_from_onnx(path: Path):
    """An ov.Model of the ONNX file ``path`` with its local functions inlined (the file is left as it is).

    The inlined graph is written to a temporary folder with its weights as external data (a graph that already
    has external data gets a hard link to its data file there, or a copy across file systems), and OpenVINO
    reads it from that folder, mapping the weights:
    inlining and serialising the weights in memory took SmolLM2's fp32 segment graph (540 MB) to a peak of
    3.3 GiB, this way 1.3 GiB, onnxruntime's. The folder is removed once read (a mapped file outlives its name
    on Linux; on a tmpfs /tmp the weights are in memory until then)."""
    import onnx
    from onnx import external_data_helper
    from onnx.inliner import inline_local_functions

    core()
    proto = load_onnx(path, external_data=False)
    linked = {dict((e.key, e.value) for e in t.external_data)["location"]
              for t in proto.graph.initializer if external_data_helper.uses_external_data(t)}
    with tempfile.TemporaryDirectory(prefix="infini-ov-", ignore_cleanup_errors=True) as tmp:
        for location in linked:   # OpenVINO refuses a symbolic link that leads out of the folder it reads
            _link_or_copy(path.parent / location, Path(tmp) / location)
        external_data_helper.convert_model_to_external_data(proto, location=INLINED_WEIGHTS, size_threshold=1024)
        external_data_helper.write_external_data_tensors(proto, tmp)   # writes each tensor out, drops it here
        inlined = Path(tmp) / path.name
        onnx.save(inline_local_functions(proto), str(inlined))
        del proto
        try:
            return core().read_model(str(inlined))
        except RuntimeError as e:   # OpenVINO raises RuntimeError with the C++ file and check first
            raise IncompatibleArtifactError(f"openvino cannot read {path}: {_first_line(e)}") from None


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the temporary folder is on the same file system, else a copy."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


NOISE = ("Exception from", "Check '", "Summary:", "To facilitate", "Model wasn't fully converted")


def _first_line(e: Exception) -> str:
    """The reason in OpenVINO's message, one line: its messages start with the C++ file and check that threw and
    end with a pointer to the extension docs; the reason is the last line that is neither."""
    lines = [ln.strip().removeprefix("-- ") for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(NOISE)]
    return lines[-1][:300] if lines else type(e).__name__


def check_model_io(model, inputs, outputs, path: Path) -> None:
    """The read graph's inputs and outputs are the manifest's: names, order, element types, ranks, fixed dims
    (symbolic dims are dynamic in OpenVINO). A graph swapped for another is refused here, in one line."""
    def want(s):
        return (s.name, OV_TYPES.get(s.dtype, s.dtype), [d if isinstance(d, int) else -1 for d in s.shape])

    def got(port):
        dims = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
        return (port.get_any_name(), port.get_element_type().get_type_name(), dims)

    for kind, ports, specs in (("input", model.inputs, inputs), ("output", model.outputs, outputs)):
        actual, expected = [got(p) for p in ports], [want(s) for s in specs]
        if actual != expected:
            first = next(i for i in range(max(len(actual), len(expected)))
                         if i >= len(actual) or i >= len(expected) or actual[i] != expected[i])
            found = actual[first] if first < len(actual) else "nothing"
            listed = expected[first] if first < len(expected) else "nothing"
            raise IncompatibleArtifactError(f"{path} is not the graph its manifest lists: its {kind} {first} is "
                                            f"{found}, infini.json lists {listed} (another graph under this name?)")


class OvRunner(BaseRunner):
    """Runs one graph of an export folder on OpenVINO: ``graph`` segment (default), decode or chunk;
    ``device`` cpu (gpu, npu where OpenVINO has them); ``precision`` f32 (default: parity with onnxruntime)
    or bf16; ``threads``: INFERENCE_NUM_THREADS. Tensors in and out are torch CPU tensors."""

    name = "openvino"

    def __init__(self, export_dir, device: str = "cpu", threads: int | None = None, graph: str = "segment",
                 precision: str = "f32"):
        from ..limits import max_threads

        self.export_dir = Path(export_dir)
        self.manifest = load_manifest(self.export_dir)
        if graph not in self.manifest.graphs:
            raise IncompatibleArtifactError(f"{self.export_dir} has no {graph!r} graph; it has: "
                                            f"{', '.join(self.manifest.graphs)}")
        if threads is not None and not 1 <= threads <= max_threads():
            raise BadInputError(f"threads must be in [1, {max_threads()}] (4 per CPU), got {threads}")
        entry = self.manifest.graphs[graph]
        self.graph = graph
        self.ov_device = check_device(device)
        self.hint = check_precision(precision, self.ov_device)
        super().__init__(self.manifest.config, entry.inputs, entry.outputs, "cpu")
        self.path = self.manifest.verify_graph(self.export_dir, entry.file)
        self.threads = threads
        self.label = f"openvino-{self.ov_device.lower()}-{self.hint}"
        self.autocast = "bf16" if self.hint == "bf16" else None    # what `infini run` reports, as torch's
        self.compiled = self.request = None

    def activate_impl(self):
        model = model_from_onnx(self.path)
        check_model_io(model, self.input_specs, self.output_specs, self.path)
        info = model.get_rt_info()
        meta = info["framework"] if "framework" in info else {}
        check_identity({k: meta[k].astype(str) for k in meta}, self.manifest, self.graph, self.path)
        config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads and self.ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            self.compiled = core().compile_model(model, self.ov_device, config)
        except RuntimeError as e:
            raise IncompatibleArtifactError(f"openvino cannot compile {self.path} for {self.ov_device}: "
                                            f"{_first_line(e)}") from None
        self.request = self.compiled.create_infer_request()

    def infer_impl(self, feed):
        arrays = {s.name: np.ascontiguousarray(feed[s.name].detach().cpu().numpy()) for s in self.input_specs}
        self.request.infer(arrays)
        return {s.name: _output(self.request.get_tensor(s.name), s.dtype) for s in self.output_specs}

    def deactivate_impl(self):
        self.compiled = self.request = None


def _output(tensor, dtype: str) -> torch.Tensor:
    """An output as a torch tensor of its own memory: OpenVINO reuses its output buffers, and a stream feeds
    this call's state back as the next call's inputs. bf16 (logits of a bf16 export) arrives as raw 16 bits."""
    array = np.array(tensor.data, copy=True)
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array).to(TORCH_DTYPES[dtype])
