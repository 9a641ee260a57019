"""The reference backend: the PyTorch model's step, on the CPU or a CUDA GPU."""

from __future__ import annotations

from functools import partial

import torch

from ..errors import MissingBackendError
from ..models import spec
from ..models.chunk import chunk_step
from ..models.decode import decode_step
from ..models.model import InfiniTransformer
from .runner import BaseRunner


class TorchRunner(BaseRunner):
    """Runs one graph of the model in inference mode: ``graph="segment"`` (``InfiniTransformer.step``),
    ``graph="decode"`` (``models.decode.decode_step``, one token with the in-segment KV cache) or
    ``graph="chunk"`` (``models.chunk.chunk_step``, n tokens appended to that cache).
    Inputs and outputs are named by models/spec.py; state stays on ``device``."""

    name = "torch"

    def __init__(self, model: InfiniTransformer, device: str = "cpu", graph: str = "segment"):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MissingBackendError(f"device {device!r} requested but torch sees no CUDA GPU; available: cpu")
        config = model.config
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        super().__init__(config, *spec.graph_specs(graph, config, dtype), device)
        self.model = model
        self.graph = graph
        self._fn = {"segment": model.step, "decode": partial(decode_step, model),
                    "chunk": partial(chunk_step, model)}[graph]

    def activate_impl(self):
        self.model.to(self.device).eval()

    def infer_impl(self, feed):
        args = [feed[s.name].to(self.device) for s in self.input_specs]  # spec order = argument order
        with torch.inference_mode():
            outputs = self._fn(*args)
        return {s.name: out for s, out in zip(self.output_specs, outputs)}
