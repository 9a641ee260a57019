"""The reference backend: the PyTorch model's step, on the CPU or a CUDA GPU."""

from __future__ import annotations

import copy
import weakref
from functools import partial

import torch
from torch import nn

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

    ``autocast="bf16"`` (or ``"fp16"``) runs the weights' matmuls under ``torch.autocast`` over a copy of the
    Linear weights in that dtype (:func:`half_linears`: autocast over float32 weights would read every weight as
    float32 and cast it again at each call, 3x the bytes a decode step needs to read); the numbers are the
    same, the memory path stays float32 (models/memory.py) and every output is float32, as the step's spec
    says. ``compile=True`` wraps the step in ``torch.compile`` (first call compiles).

    The decode and chunk steps write the new keys and values into the ``k_cache``/``v_cache`` they are fed
    and return those tensors (no copy of the cache per token); everything else is a new tensor."""

    name = "torch"
    partial_logits = True

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
        self.autocast, self.compile = autocast, compile
        self.partial_logits = not compile   # a compiled step keeps one shape: every position's logits, then cut
        self._fn = None
        self.label = " ".join(["torch", *(["compile"] if compile else []), *([f"{autocast} autocast"] if autocast else [])])

    def activate_impl(self):
        self.model.to(self.device).eval()
        net = half_linears(self.model, AUTOCAST[self.autocast]) if self.autocast else self.model
        fn = {"segment": net.step, "decode": partial(decode_step, net, inplace=True),
              "chunk": partial(chunk_step, net, inplace=True)}[self.graph]   # the cache written where it is
        self._fn = torch.compile(fn, dynamic=False) if self.compile else fn

    def infer_impl(self, feed, logits_from: int = 0):
        args = [feed[s.name].to(self.device) for s in self.input_specs]  # spec order = argument order
        with torch.inference_mode(), autocast_context(self.autocast, self.device):
            outputs = self._fn(*args, logits_from=logits_from) if logits_from else self._fn(*args)
        return {s.name: out.to(TORCH_DTYPES[s.dtype]) for s, out in zip(self.output_specs, outputs)}


_HALVES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def half_linears(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with every ``nn.Linear`` weight (the output head included, untied from the embedding, which
    stays as it is) copied once into ``dtype``; every other parameter and buffer is ``model``'s own, not copied.
    Under autocast to ``dtype`` its matmuls are the ones autocast computes over the float32 weights, without
    re-casting each weight at every call. One copy per model and dtype (the segment, decode and chunk runners of
    a stream share it), made again when a weight of ``model`` changed since (training: the tensors' version)."""
    versions = tuple(p._version for p in model.parameters())
    held = _HALVES.setdefault(model, {})
    if dtype in held and held[dtype][0] == versions and held[dtype][1]() is not None:
        return held[dtype][1]()

    def twin(module: nn.Module) -> nn.Module:
        new = copy.copy(module)   # shares the module's attributes; its own dicts of children and parameters
        new._modules = {name: twin(child) for name, child in module._modules.items()}
        new._parameters = dict(module._parameters)
        if isinstance(module, nn.Linear):
            new._parameters["weight"] = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        return new

    half = twin(model)
    held[dtype] = (versions, weakref.ref(half))
    return half
