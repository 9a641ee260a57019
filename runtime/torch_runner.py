"""The reference backend: the PyTorch model's step, on the CPU or a CUDA GPU."""

from __future__ import annotations

import torch

from ..errors import MissingBackendError
from ..models import spec
from ..models.model import InfiniTransformer
from .runner import BaseRunner


class TorchRunner(BaseRunner):
    """Runs ``InfiniTransformer.step`` in inference mode. State stays on ``device``."""

    name = "torch"

    def __init__(self, model: InfiniTransformer, device: str = "cpu"):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MissingBackendError(f"device {device!r} requested but torch sees no CUDA GPU; available: cpu")
        config = model.config
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        super().__init__(config, spec.segment_inputs(config), spec.segment_outputs(config, dtype), device)
        self.model = model

    def activate_impl(self):
        self.model.to(self.device).eval()

    def infer_impl(self, feed):
        with torch.inference_mode():
            logits, memory, norm = self.model.step(
                feed[spec.TOKENS].to(self.device), feed[spec.MEMORY].to(self.device), feed[spec.NORM].to(self.device))
        return {spec.LOGITS: logits, spec.MEMORY_OUT: memory, spec.NORM_OUT: norm}
