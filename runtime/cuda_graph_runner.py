"""The torch backend on a GPU with the whole segment step captured as CUDA graphs.

State stays on the GPU in two static buffers, A and B; the step never reads and
writes one buffer in a call, so there is one graph per buffer parity:

    graph[0]: tokens, (memory, norm)[A] -> logits, (memory, norm)[B]
    graph[1]: tokens, (memory, norm)[B] -> logits, (memory, norm)[A]

A Stream passes the state it got back from the previous call, which *is* the
other buffer, so a full segment costs one token copy and one graph replay: no
state copy, no kernel-launch overhead. Any other state tensor is copied into
buffer A first. Full segments (n == N) replay a graph captured on first use for
that batch size; partial segments (n < N) run eagerly, like TorchRunner.
"""

from __future__ import annotations

import torch

from ..errors import MissingBackendError
from ..models import spec
from ..models.model import InfiniTransformer
from .torch_runner import TorchRunner


class _Graphs:
    """Static buffers and the two graphs for one batch size."""

    def __init__(self, model: InfiniTransformer, batch: int, device: torch.device, warmup: int):
        cfg = model.config
        self.tokens = torch.zeros(batch, cfg.segment_len, dtype=torch.int64, device=device)
        memory, norm = model.initial_state(batch, device)
        self.memory = [memory, memory.clone()]   # buffers A, B
        self.norm = [norm, norm.clone()]
        self.logits: list[torch.Tensor] = []
        self.graphs: list[torch.cuda.CUDAGraph] = []
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):   # compiles the Triton kernels and fills the RoPE tables outside capture
                model.step(self.tokens, self.memory[0], self.norm[0])
        torch.cuda.current_stream(device).wait_stream(side)
        pool = None
        for parity in (0, 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                logits, memory_out, norm_out = model.step(self.tokens, self.memory[parity], self.norm[parity])
                self.memory[1 - parity].copy_(memory_out)
                self.norm[1 - parity].copy_(norm_out)
            pool = graph.pool()   # both graphs share one memory pool: they never run at once
            self.graphs.append(graph)
            self.logits.append(logits)

    def parity_of(self, memory: torch.Tensor, norm: torch.Tensor) -> int | None:
        for parity in (0, 1):
            if memory is self.memory[parity] and norm is self.norm[parity]:
                return parity
        return None


class CudaGraphRunner(TorchRunner):
    """TorchRunner on CUDA replaying a captured segment step for full segments.

    ``infer`` returns logits as a new tensor and the state as one of the runner's two
    static buffers: it stays valid until the next-but-one call (a Stream only keeps the
    latest state); clone it to keep it longer (snapshots).
    """

    name = "torch-cudagraph"

    def __init__(self, model: InfiniTransformer, device: str = "cuda", warmup: int = 2):
        if not str(device).startswith("cuda"):
            raise MissingBackendError(f"CUDA graphs need a CUDA device, got {device!r}; use TorchRunner on the CPU")
        super().__init__(model, device)
        self.warmup = warmup
        self._graphs: dict[int, _Graphs] = {}
        self.replays = 0   # full segments run through a graph (tests and benchmarks read it)

    def deactivate_impl(self):
        self._graphs.clear()

    def infer_impl(self, feed):
        tokens = feed[spec.TOKENS]
        batch, n = tokens.shape
        if n != self.config.segment_len:
            return super().infer_impl(feed)   # partial segment: eager
        graphs = self._graphs.get(batch)
        if graphs is None:
            graphs = self._graphs[batch] = _Graphs(self.model, batch, self.device, self.warmup)
        memory, norm = feed[spec.MEMORY], feed[spec.NORM]
        parity = graphs.parity_of(memory, norm)
        if parity is None:
            parity = 0
            graphs.memory[0].copy_(memory, non_blocking=True)
            graphs.norm[0].copy_(norm, non_blocking=True)
        graphs.tokens.copy_(tokens, non_blocking=True)
        graphs.graphs[parity].replay()
        self.replays += 1
        return {spec.LOGITS: graphs.logits[parity].clone(), spec.MEMORY_OUT: graphs.memory[1 - parity],
                spec.NORM_OUT: graphs.norm[1 - parity]}
