"""The reference backend: the PyTorch model's step, on the CPU or a CUDA GPU."""

from __future__ import annotations

from functools import partial

import torch

from ..errors import BadInputError, MissingBackendError
from ..models import spec
from ..models.chunk import chunk_step
from ..models.decode import decode_step
from ..models.memory import AUTOCAST, autocast_context
from ..models.model import InfiniTransformer
from .runner import TORCH_DTYPES, BaseRunner


class TorchRunner(BaseRunner):
    """Runs one graph of the model in inference mode: ``graph="segment"`` (``InfiniTransformer.step``),
    ``graph="decode"`` (``models.decode.decode_step``, one token with the in-segment KV cache) or
    ``graph="chunk"`` (``models.chunk.chunk_step``, n tokens appended to that cache).
    Inputs and outputs are named by models/spec.py; state stays on ``device``.

    ``autocast="bf16"`` (or ``"fp16"``) runs the weights' matmuls under ``torch.autocast`` with the
    weights kept float32; the memory path stays float32 (models/memory.py) and every output is float32,
    as the step's spec says. ``compile=True`` wraps the step in ``torch.compile`` (first call compiles).

    The decode and chunk steps write the new keys and values into the ``k_cache``/``v_cache`` they are fed
    and return those tensors (no copy of the cache per token); everything else is a new tensor."""

    name = "torch"

    def __init__(self, model: InfiniTransformer, device: str = "cpu", graph: str = "segment",
                 autocast: str | None = None, compile: bool = False):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MissingBackendError(f"device {device!r} requested but torch sees no CUDA GPU; available: cpu")
        config = model.config
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        super().__init__(config, *spec.graph_specs(graph, config, dtype), device)
        self.model = model
        self.graph = graph
        if autocast is not None and autocast not in AUTOCAST:
            raise BadInputError(f"autocast {autocast!r}: expected one of {sorted(AUTOCAST)} or None")
        if autocast and dtype != "float32":
            raise BadInputError(f"autocast {autocast!r} needs float32 weights; this model's are {dtype}")
        self.autocast = autocast
        fn = {"segment": model.step, "decode": partial(decode_step, model, inplace=True),
              "chunk": partial(chunk_step, model, inplace=True)}[graph]   # the cache written where it is
        self._fn = torch.compile(fn, dynamic=False) if compile else fn
        self.label = " ".join(["torch", *(["compile"] if compile else []), *([f"{autocast} autocast"] if autocast else [])])

    def activate_impl(self):
        self.model.to(self.device).eval()

    def infer_impl(self, feed):
        args = [feed[s.name].to(self.device) for s in self.input_specs]  # spec order = argument order
        with torch.inference_mode(), autocast_context(self.autocast, self.device):
            outputs = self._fn(*args)
        return {s.name: out.to(TORCH_DTYPES[s.dtype]) for s, out in zip(self.output_specs, outputs)}

